/* SimpleOptimizer's cell, forward and exact backward, fused per block of coordinates.
 *
 *   pre = W_hh h + w_ih g (+ b)      (H, n)      h' = tanh(pre)
 *   u   = h'^T w_out                  (n,)        s  = sum_i h'_i   (H,)
 *
 * Chen et al. (2020), "Learning to learn with better convergence", section 3.1 eqs. 4-5 and
 * section 3.3 (the mean embedding enters through s). Every tensor of shape (H, n) is row-major with
 * leading dimension n (the layout of SimpleOptimizer.init_state). Each block of BLK coordinates is
 * read once from memory and worked on while it sits in L1: the matrix products with the H x H
 * weight, tanh, the output layer and the reductions happen in one pass, where the torch
 * formulation makes about ten passes (l2l_zoo/optimizers/simple.py, _FusedCell).
 *
 * Reductions over coordinates (s, the weight gradients) are summed per block and the blocks'
 * partial sums are then added in block order by one thread, so the result does not depend on the
 * number of threads. Compiled at first use by l2l_zoo/native.py; the torch code in simple.py is the
 * fallback and the reference these kernels are tested against (tests/test_native.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_math.h"

#define BLK 256

/* float32 blocks for the default hidden size H = 10, written with GCC/Clang vector extensions (8
 * lanes, one AVX register; narrower hardware gets the same code lowered by the compiler): the state
 * of eight coordinates stays in registers through the whole cell. Only full blocks (m = BLK) take
 * this path; a partial last block and other H use the generic loops. Same formulas and tanh32. */
#define HV 10
#define VL 8
static void fwd_block_f32_h10(int64_t n, int64_t s, const float *g, const float *h, const float *w_ih,
                              const float *w_hh, const float *w_out, const float *bias, float *out,
                              float *u, float *pb) {
    vf hs[HV];
    _Pragma("GCC unroll 10")
    for (int k = 0; k < HV; k++) hs[k] = vbc(0.0f);
    for (int64_t i = s; i < s + BLK; i += VL) {
        vf hv[HV], gi = vld(g + i), uu = vbc(0.0f);
        _Pragma("GCC unroll 10")
        for (int j = 0; j < HV; j++) hv[j] = vld(h + j * n + i);
        _Pragma("GCC unroll 10")
        for (int k = 0; k < HV; k++) {
            vf a = vbc(w_ih[k]) * gi + vbc(bias ? bias[k] : 0.0f);
            _Pragma("GCC unroll 10")
            for (int j = 0; j < HV; j++) a += vbc(w_hh[k * HV + j]) * hv[j];
            vf v = vtanh32(a);
            vst(out + k * n + i, v);
            uu += vbc(w_out[k]) * v;
            hs[k] += v;
        }
        vst(u + i, uu);
    }
    _Pragma("GCC unroll 10")
    for (int k = 0; k < HV; k++) pb[k] = vsum(hs[k]);
}

static void bwd_block_f32_h10(int64_t n, int64_t s, const float *g, const float *h, const float *hn,
                              const float *w_ih, const float *w_hh, const float *w_out, const float *d_h,
                              const float *d_u, const float *d_sum, float *dg, float *dh, int need_w,
                              float *pb, float *dbuf) {
    vf a_out[HV];
    _Pragma("GCC unroll 10")
    for (int k = 0; k < HV; k++) a_out[k] = vbc(0.0f);
    for (int64_t i = s; i < s + BLK; i += VL) {
        vf dd[HV], du = vld(d_u + i), dgi = vbc(0.0f);
        _Pragma("GCC unroll 10")
        for (int k = 0; k < HV; k++) {
            vf v = vld(hn + k * n + i);
            vf base = d_h ? vld(d_h + k * n + i) : vbc(0.0f);
            dd[k] = (base + vbc(w_out[k]) * du + vbc(d_sum[k])) * (vbc(1.0f) - v * v);
            a_out[k] += v * du;
            vst(dbuf + k * BLK + (i - s), dd[k]);
            dgi += vbc(w_ih[k]) * dd[k];
        }
        if (dg) vst(dg + i, dgi);
        if (dh)
            _Pragma("GCC unroll 10")
            for (int j = 0; j < HV; j++) {
                vf a = vbc(0.0f);
                _Pragma("GCC unroll 10")
                for (int k = 0; k < HV; k++) a += vbc(w_hh[k * HV + j]) * dd[k];
                vst(dh + j * n + i, a);
            }
    }
    _Pragma("GCC unroll 10")
    for (int k = 0; k < HV; k++) pb[HV * HV + HV + k] = vsum(a_out[k]);
    if (!need_w) return;
    _Pragma("GCC unroll 10")
    for (int k = 0; k < HV; k++) {
        const float *dk = dbuf + k * BLK;
        for (int j0 = 0; j0 < HV; j0 += 5) {  /* five j at a time (+ g on the second half) */
            vf acc[6];
            _Pragma("GCC unroll 10")
            for (int q = 0; q < 6; q++) acc[q] = vbc(0.0f);
            for (int64_t i = 0; i < BLK; i += VL) {
                vf dv = vld(dk + i);
                _Pragma("GCC unroll 10")
                for (int q = 0; q < 5; q++) acc[q] += dv * vld(h + (j0 + q) * n + s + i);
                if (j0) acc[5] += dv * vld(g + s + i);
            }
            _Pragma("GCC unroll 10")
            for (int q = 0; q < 5; q++) pb[k * HV + j0 + q] = vsum(acc[q]);
            if (j0) pb[HV * HV + k] = vsum(acc[5]);
        }
    }
}

/* Coordinates come in segments of seg (n = nseg * seg; seg = n for one segment): the smoothness
 * PGD stacks T independent problems, each with its own mean embedding, so the sums over coordinates
 * (hsum, and the d_sum the backward receives) are per segment. Each segment is cut into
 * nbs = ceil(seg / BLK) blocks from its own start, so no block straddles two segments; with one
 * segment this is the plain cut of n into blocks of BLK. */
static inline void block_range(int64_t b, int64_t seg, int64_t nbs, int64_t *s, int64_t *m, int64_t *q) {
    int64_t r = b % nbs;
    *q = b / nbs;
    *s = *q * seg + r * BLK;
    *m = seg - r * BLK < BLK ? seg - r * BLK : BLK;
}

/* forward: out (H, n) = tanh(W_hh h + w_ih g + b); u (n,); hsum (nseg, H), one row per segment.
 * part: scratch of nblk * H values (nblk = nseg * ceil(seg / BLK)). bias may be NULL. */
#define CELL_FORWARD(T, NAME, TANH, FAST)                                                                 \
void NAME(int64_t n, int64_t seg, int64_t H, const T *g, const T *h, const T *w_ih, const T *w_hh,   \
          const T *w_out, const T *bias, T *out, T *u, T *hsum, T *part, int nthreads) {             \
    int64_t nbs = (seg + BLK - 1) / BLK, nseg = n / seg, nblk = nseg * nbs;                           \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                               \
    for (int64_t b = 0; b < nblk; b++) {                                                              \
        int64_t s, m, q;                                                                              \
        block_range(b, seg, nbs, &s, &m, &q);                                                         \
        if (FAST && H == HV && m == BLK) {                                                            \
            fwd_block_f32_h10(n, s, (const float *)g, (const float *)h, (const float *)w_ih,           \
                              (const float *)w_hh, (const float *)w_out, (const float *)bias,          \
                              (float *)out, (float *)u, (float *)(part + b * H));                       \
            continue;                                                                                 \
        }                                                                                             \
        T acc[BLK], ub[BLK];                                                                          \
        for (int64_t i = 0; i < m; i++) ub[i] = 0;                                                    \
        for (int64_t k = 0; k < H; k++) {                                                             \
            T wi = w_ih[k], bk = bias ? bias[k] : (T)0, wo = w_out[k];                                \
            const T *gs = g + s;                                                                      \
            _Pragma("omp simd")                                                                       \
            for (int64_t i = 0; i < m; i++) acc[i] = wi * gs[i] + bk;                                 \
            for (int64_t j = 0; j < H; j++) {                                                         \
                T w = w_hh[k * H + j];                                                                \
                const T *hj = h + j * n + s;                                                          \
                _Pragma("omp simd")                                                                   \
                for (int64_t i = 0; i < m; i++) acc[i] += w * hj[i];                                  \
            }                                                                                         \
            T *o = out + k * n + s;                                                                   \
            T hs = 0;                                                                                 \
            _Pragma("omp simd reduction(+:hs)")                                                       \
            for (int64_t i = 0; i < m; i++) {                                                         \
                T v = TANH(acc[i]);                                                                   \
                o[i] = v;                                                                             \
                ub[i] += wo * v;                                                                      \
                hs += v;                                                                              \
            }                                                                                         \
            part[b * H + k] = hs;                                                                     \
        }                                                                                             \
        memcpy(u + s, ub, (size_t)m * sizeof(T));                                                     \
    }                                                                                                 \
    for (int64_t q = 0; q < nseg; q++) {                                                              \
        T *hq = hsum + q * H;                                                                         \
        for (int64_t k = 0; k < H; k++) hq[k] = 0;                                                    \
        for (int64_t b = q * nbs; b < (q + 1) * nbs; b++)                                             \
            for (int64_t k = 0; k < H; k++) hq[k] += part[b * H + k];                                 \
    }                                                                                                 \
}

/* backward of the forward above (no bias) given dL/dh' (d_h, (H, n) or NULL), dL/du (d_u or NULL)
 * and dL/ds (d_sum, (nseg, H), or NULL):
 *   d = (d_h + w_out d_u^T + d_sum[segment]) * (1 - h'^2)
 *   dg = d^T w_ih (n,)   dh = W_hh^T d (H, n)   dW_hh = d h^T   dw_ih = d g   dw_out = h' d_u
 * dg, dh may be NULL (not needed); need_w = 0 skips dW_hh and dw_ih.
 * part: scratch of nblk * (H*H + 2H) values; dw_*: outputs (overwritten). */
#define CELL_BACKWARD(T, NAME, FAST)                                                                      \
void NAME(int64_t n, int64_t seg, int64_t H, const T *g, const T *h, const T *hn, const T *w_ih,    \
          const T *w_hh, const T *w_out, const T *d_h, const T *d_u, const T *d_sum, T *dg, T *dh,   \
          int need_w, T *dw_ih, T *dw_hh, T *dw_out, T *part, int nthreads) {                         \
    int64_t nbs = (seg + BLK - 1) / BLK, nblk = (n / seg) * nbs, W = H * H + 2 * H;                   \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                               \
    for (int64_t b = 0; b < nblk; b++) {                                                              \
        int64_t s, m, q;                                                                              \
        block_range(b, seg, nbs, &s, &m, &q);                                                         \
        const T *dsq = d_sum ? d_sum + q * H : NULL;                                                  \
        T *d = (T *)malloc((size_t)(H * BLK) * sizeof(T));                                            \
        if (FAST && H == HV && m == BLK && d_u && dsq) {                                              \
            bwd_block_f32_h10(n, s, (const float *)g, (const float *)h, (const float *)hn,             \
                              (const float *)w_ih, (const float *)w_hh, (const float *)w_out,          \
                              (const float *)d_h, (const float *)d_u, (const float *)dsq,              \
                              (float *)dg, (float *)dh, need_w, (float *)(part + b * W), (float *)d);   \
            free(d);                                                                                  \
            continue;                                                                                 \
        }                                                                                             \
        T *pb = part + b * W;                                                                         \
        for (int64_t k = 0; k < H; k++) {                                                             \
            T *dk = d + k * BLK;                                                                      \
            const T *hk = hn + k * n + s;                                                             \
            T wo = w_out[k], ds = dsq ? dsq[k] : (T)0;                                                \
            if (d_h) {                                                                                \
                const T *dhk = d_h + k * n + s;                                                       \
                _Pragma("omp simd")                                                                   \
                for (int64_t i = 0; i < m; i++) dk[i] = dhk[i] + ds;                                  \
            } else {                                                                                  \
                for (int64_t i = 0; i < m; i++) dk[i] = ds;                                           \
            }                                                                                         \
            T acc = 0;                                                                                \
            if (d_u) {                                                                                \
                const T *du = d_u + s;                                                                \
                _Pragma("omp simd reduction(+:acc)")                                                  \
                for (int64_t i = 0; i < m; i++) { dk[i] += wo * du[i]; acc += hk[i] * du[i]; }         \
            }                                                                                         \
            pb[H * H + H + k] = acc;                                                                  \
            _Pragma("omp simd")                                                                       \
            for (int64_t i = 0; i < m; i++) dk[i] *= (T)1 - hk[i] * hk[i];                            \
        }                                                                                             \
        if (need_w) {                                                                                 \
            for (int64_t k = 0; k < H; k++) {                                                         \
                const T *dk = d + k * BLK;                                                            \
                for (int64_t j = 0; j < H; j++) {                                                     \
                    const T *hj = h + j * n + s;                                                      \
                    T acc = 0;                                                                        \
                    _Pragma("omp simd reduction(+:acc)")                                              \
                    for (int64_t i = 0; i < m; i++) acc += dk[i] * hj[i];                             \
                    pb[k * H + j] = acc;                                                              \
                }                                                                                     \
                const T *gs = g + s;                                                                  \
                T acc = 0;                                                                            \
                _Pragma("omp simd reduction(+:acc)")                                                  \
                for (int64_t i = 0; i < m; i++) acc += dk[i] * gs[i];                                 \
                pb[H * H + k] = acc;                                                                  \
            }                                                                                         \
        }                                                                                             \
        if (dg) {                                                                                     \
            T *o = dg + s;                                                                            \
            for (int64_t i = 0; i < m; i++) o[i] = 0;                                                 \
            for (int64_t k = 0; k < H; k++) {                                                         \
                const T *dk = d + k * BLK;                                                            \
                T w = w_ih[k];                                                                        \
                _Pragma("omp simd")                                                                   \
                for (int64_t i = 0; i < m; i++) o[i] += w * dk[i];                                    \
            }                                                                                         \
        }                                                                                             \
        if (dh) {                                                                                     \
            for (int64_t j = 0; j < H; j++) {                                                         \
                T *o = dh + j * n + s;                                                                \
                T acc[BLK];                                                                           \
                for (int64_t i = 0; i < m; i++) acc[i] = 0;                                           \
                for (int64_t k = 0; k < H; k++) {                                                     \
                    const T *dk = d + k * BLK;                                                        \
                    T w = w_hh[k * H + j];                                                            \
                    _Pragma("omp simd")                                                               \
                    for (int64_t i = 0; i < m; i++) acc[i] += w * dk[i];                              \
                }                                                                                     \
                memcpy(o, acc, (size_t)m * sizeof(T));                                                \
            }                                                                                         \
        }                                                                                             \
        free(d);                                                                                      \
    }                                                                                                 \
    for (int64_t k = 0; k < W; k++) {                                                                 \
        T acc = 0;                                                                                    \
        if (k < H * H + H && !need_w) { continue; }                                                   \
        for (int64_t b = 0; b < nblk; b++) acc += part[b * W + k];                                    \
        if (k < H * H) dw_hh[k] = acc;                                                                \
        else if (k < H * H + H) dw_ih[k - H * H] = acc;                                               \
        else dw_out[k - H * H - H] = acc;                                                             \
    }                                                                                                 \
}

CELL_FORWARD(float, simple_cell_forward_f32, tanh32, 1)
CELL_FORWARD(double, simple_cell_forward_f64, tanh64, 0)
CELL_BACKWARD(float, simple_cell_backward_f32, 1)
CELL_BACKWARD(double, simple_cell_backward_f64, 0)

/* the scratch (values) that part must hold: the Python side allocates it, the kernels define it */
int64_t simple_cell_forward_scratch(int64_t n, int64_t seg, int64_t H) {
    return (n / seg) * ((seg + BLK - 1) / BLK) * H;
}
int64_t simple_cell_backward_scratch(int64_t n, int64_t seg, int64_t H) {
    return (n / seg) * ((seg + BLK - 1) / BLK) * (H * H + 2 * H);
}

/* the float32 tanh alone, so that its accuracy is tested (tests/test_native.py) */
void simple_cell_tanh_f32(int64_t n, const float *x, float *y) {
    _Pragma("omp simd")
    for (int64_t i = 0; i < n; i++) y[i] = tanh32(x[i]);
}
