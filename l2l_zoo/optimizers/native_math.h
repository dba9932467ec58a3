/* Vectorisable float32 math shared by the native kernels (simple_cell.c, lstm_cell.c), and the
 * 8-lane float32 / 4-lane float64 vector types they use (GCC/Clang vector extensions: one AVX
 * register; narrower hardware gets the same code lowered by the compiler). Every kernel source that
 * includes this file is hashed together with it (l2l_zoo/native.py), so a change here rebuilds them.
 */
#ifndef L2L_ZOO_NATIVE_MATH_H
#define L2L_ZOO_NATIVE_MATH_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* tanh in float32, vectorisable: an odd Taylor polynomial for |x| < 0.25 (truncation error below
 * 1e-10), else (1 - e) / (1 + e) with e = exp(-2|x|) = 2^k p(f) (Cody-Waite split, degree-7
 * polynomial for 2^f on [-0.5, 0.5], error below 1e-8); saturates at |x| >= 9. */
static inline float tanh32(float x) {
    float ax = fabsf(x);
    float z = ax > 9.0f ? 9.0f : ax;  /* NaN stays NaN */
    float t = -2.0f * 1.4426950408889634f * z;
    float k = (t + 12582912.0f) - 12582912.0f;  /* round to nearest (|t| < 2^22; no -ffast-math) */
    float f = (t - k) * 0.6931471805599453f;
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666666666666666e-1f + f * (4.1666666666666664e-2f
              + f * (8.3333333333333332e-3f + f * (1.3888888888888889e-3f + f * 1.9841269841269841e-4f))))));
    int32_t bits = ((int32_t)k + 127) << 23;
    float sc;
    memcpy(&sc, &bits, sizeof sc);
    float e = p * sc;
    float big = (1.0f - e) / (1.0f + e);
    float x2 = x * x;
    float small = ax * (1.0f + x2 * (-3.3333333333333331e-1f + x2 * (1.3333333333333333e-1f
                  + x2 * (-5.3968253968253971e-2f + x2 * (2.1869488536155203e-2f + x2 * -8.8632355299021973e-3f)))));
    float r = ax < 0.25f ? small : big;
    return copysignf(r, x);
}

static inline double tanh64(double x) { return tanh(x); }

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));

static inline vf vld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vst(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vbc(float a) { vf v = {a, a, a, a, a, a, a, a}; return v; }
static inline vi ibc(int32_t a) { vi v = {a, a, a, a, a, a, a, a}; return v; }
static inline float vsum(vf v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
static inline vf vsel(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* 2^t for t in [-126, 0] on eight lanes: 2^k p(f) with k = round(t) and a degree-7 Taylor
 * polynomial p for e^f, f = (t - k) ln 2 in [-0.35, 0.35] (error below 1e-8 relative); the same
 * operations as in the scalar tanh32. */
static inline vf vexp2_neg(vf t) {
    vf k = (t + vbc(12582912.0f)) - vbc(12582912.0f);
    vf f = (t - k) * vbc(0.6931471805599453f);
    vf p = vbc(1.0f) + f * (vbc(1.0f) + f * (vbc(0.5f) + f * (vbc(1.6666666666666666e-1f) + f * (vbc(4.1666666666666664e-2f)
           + f * (vbc(8.3333333333333332e-3f) + f * (vbc(1.3888888888888889e-3f) + f * vbc(1.9841269841269841e-4f)))))));
    vi bits = (__builtin_convertvector(k, vi) + ibc(127)) << 23;
    return p * (vf)bits;
}

/* tanh32 on eight lanes: the same operations as the scalar tanh32 */
static inline vf vtanh32(vf x) {
    vi sign = (vi)x & ibc((int32_t)0x80000000);
    vf ax = (vf)((vi)x & ibc(0x7fffffff));
    vf z = vsel(ax > vbc(9.0f), vbc(9.0f), ax);
    vf e = vexp2_neg(vbc(-2.0f * 1.4426950408889634f) * z);
    vf big = (vbc(1.0f) - e) / (vbc(1.0f) + e);
    vf x2 = x * x;
    vf small = ax * (vbc(1.0f) + x2 * (vbc(-3.3333333333333331e-1f) + x2 * (vbc(1.3333333333333333e-1f)
               + x2 * (vbc(-5.3968253968253971e-2f) + x2 * (vbc(2.1869488536155203e-2f) + x2 * vbc(-8.8632355299021973e-3f))))));
    return (vf)((vi)vsel(ax < vbc(0.25f), small, big) | sign);
}

/* e^-z for z in [0, 87] on eight lanes, to full float32 accuracy over that range: 2^-k e^r with
 * k = round(z log2 e) and r = k ln 2 - z in [-0.35, 0.35], ln 2 split in two parts (Cody-Waite) so
 * that r is exact for large z, and the same polynomial for e^r as vexp2_neg. */
static inline vf vexp_neg(vf z) {
    vf k = (z * vbc(1.4426950408889634f) + vbc(12582912.0f)) - vbc(12582912.0f);
    vf r = (k * vbc(0.693145751953125f) - z) + k * vbc(1.428606765330187e-06f);
    vf p = vbc(1.0f) + r * (vbc(1.0f) + r * (vbc(0.5f) + r * (vbc(1.6666666666666666e-1f) + r * (vbc(4.1666666666666664e-2f)
           + r * (vbc(8.3333333333333332e-3f) + r * (vbc(1.3888888888888889e-3f) + r * vbc(1.9841269841269841e-4f)))))));
    vi bits = (ibc(127) - __builtin_convertvector(k, vi)) << 23;
    return p * (vf)bits;
}

/* the logistic sigmoid on eight lanes: e = exp(-|x|) (|x| clamped at 87, where e is still a normal
 * float), 1 / (1 + e) for x >= 0 and e / (1 + e) below, so that small values keep their relative
 * accuracy; NaN stays NaN. */
static inline vf vsigmoid32(vf x) {
    vf ax = (vf)((vi)x & ibc(0x7fffffff));
    vf z = vsel(ax > vbc(87.0f), vbc(87.0f), ax);
    vf e = vexp_neg(z);
    vf r = vbc(1.0f) / (vbc(1.0f) + e);
    return vsel(x < vbc(0.0f), e * r, r);
}

typedef double vd __attribute__((vector_size(32)));
static inline vd vldd(const double *p) { vd v; memcpy(&v, p, sizeof v); return v; }
static inline void vstd(double *p, vd v) { memcpy(p, &v, sizeof v); }
static inline vd vbcd(double a) { vd v = {a, a, a, a}; return v; }
static inline double vsumd(vd v) { return (v[0] + v[2]) + (v[1] + v[3]); }
/* float64 is the tests' reference precision: libm, lane by lane */
static inline vd vtanh64(vd x) { vd r; for (int i = 0; i < 4; i++) r[i] = tanh(x[i]); return r; }
static inline vd vsigmoid64(vd x) {
    vd r;
    for (int i = 0; i < 4; i++) r[i] = x[i] >= 0 ? 1.0 / (1.0 + exp(-x[i])) : exp(x[i]) / (1.0 + exp(x[i]));
    return r;
}

#endif
