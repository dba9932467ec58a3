/* One layer of the coordinate-wise LSTM of DMOptimizer and RNNProp, forward and exact backward,
 * fused per block of coordinates.
 *
 *   z = [x, h]  (K = d + H)      p = W z + b  (4H; gates in PyTorch's order i, f, g, o)
 *   i, f, o = sigmoid(p_i, p_f, p_o)    g = tanh(p_g)
 *   c' = f c + i g               h' = o tanh(c')
 *
 * Andrychowicz et al. (2016), section 2.1 (the coordinate-wise LSTM of Fig. 3, every coordinate an
 * independent copy sharing the weights); Lv et al. (2017), section 3 (RNNProp's two LSTM layers).
 * x (n, d), h, c, h', c' (n, H) are row-major (one row per coordinate, the layout of
 * CoordLSTM.init_hidden); W (4H, K) = [W_ih, W_hh] and b = b_ih + b_hh.
 *
 * A block of LB coordinates is transposed into gate-major scratch (one row per input, gate or state
 * unit, LB values each) so that every product and nonlinearity runs on vectors of coordinates: the
 * small matrix product is a loop of vector multiply-adds into LB/L registers, and nothing of size
 * (n, 4H) goes to memory. The backward recomputes the block's gates from (x, h, c) instead of
 * reading saved activations (one small product, where the torch formulas keep five (n, 4H) tensors).
 *
 * Weight gradients are summed per super-block of SB blocks, and the super-blocks' partial sums are
 * then added in order by one thread, so results do not depend on the number of threads. Compiled at
 * first use by l2l_zoo/native.py; the torch formulas in features.py (lstm_cell) are the fallback and
 * the reference these kernels are tested against (tests/test_native.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_math.h"

#define LB 64 /* coordinates per block */
#define SB 16 /* blocks per super-block: the unit of the ordered weight-gradient sums */

/* Input arrays come in either layout: row-major (n, cols) (cm = 0: a coordinate's values side by
 * side, e.g. the zero state of CoordLSTM.init_hidden) or column-major with leading dimension n (cm = 1:
 * each unit's values over the coordinates side by side, the (cols, n) transpose). The kernels write
 * column-major, so from the second step of an unroll on, every full block reads its rows in place;
 * other blocks are copied into block scratch rows of LB values, with lanes m..LB-1 zero (they give
 * finite gates and zero gradients, so the weight-gradient sums are not changed by them). */
#define LSTM_KERNELS(T, V, L, SFX, VLD, VST, VBC, VSUM, VTANH, VSIG)                                  \
/* rows[j] = LB values of column j of a for coordinates s..s+m-1, in place or copied into scratch */   \
static void rows_##SFX(const T *a, int cm, int64_t n, int64_t cols, int64_t s, int64_t m, T *scratch, \
                       const T **rows) {                                                              \
    for (int64_t j = 0; j < cols; j++) {                                                              \
        if (a && cm && m == LB) { rows[j] = a + j * n + s; continue; }                                \
        T *r = scratch + j * LB;                                                                      \
        for (int64_t q = 0; q < m; q++) r[q] = !a ? (T)0 : cm ? a[j * n + s + q] : a[(s + q) * cols + j]; \
        for (int64_t q = m; q < LB; q++) r[q] = 0;                                                    \
        rows[j] = r;                                                                                  \
    }                                                                                                 \
}                                                                                                     \
/* column-major output: the first m values of each of cols scratch rows */                            \
static void put_##SFX(const T *rows, int64_t cols, int64_t n, int64_t s, int64_t m, T *a) {           \
    for (int64_t j = 0; j < cols; j++) memcpy(a + j * n + s, rows + j * LB, (size_t)m * sizeof(T));   \
}                                                                                                     \
/* P (G, LB) = W (G, K) Z (K, LB) + b, Z given by its rows */                                         \
static void matmul_##SFX(int64_t G, int64_t K, const T *W, const T *b, const T *const *Z, T *P) {     \
    for (int64_t g = 0; g < G; g++) {                                                                 \
        V acc[LB / L];                                                                                \
        for (int v = 0; v < LB / L; v++) acc[v] = VBC(b[g]);                                          \
        for (int64_t j = 0; j < K; j++) {                                                             \
            V w = VBC(W[g * K + j]);                                                                  \
            const T *z = Z[j];                                                                        \
            for (int v = 0; v < LB / L; v++) acc[v] += w * VLD(z + v * L);                            \
        }                                                                                             \
        for (int v = 0; v < LB / L; v++) VST(P + g * LB + v * L, acc[v]);                             \
    }                                                                                                 \
}                                                                                                     \
/* DZ (K, LB) = W^T (K, G) P (G, LB) */                                                               \
static void matmul_t_##SFX(int64_t G, int64_t K, const T *W, const T *P, T *DZ) {                     \
    for (int64_t j = 0; j < K; j++) {                                                                 \
        V acc[LB / L];                                                                                \
        for (int v = 0; v < LB / L; v++) acc[v] = VBC((T)0);                                          \
        for (int64_t g = 0; g < G; g++) {                                                             \
            V w = VBC(W[g * K + j]);                                                                  \
            for (int v = 0; v < LB / L; v++) acc[v] += w * VLD(P + g * LB + v * L);                   \
        }                                                                                             \
        for (int v = 0; v < LB / L; v++) VST(DZ + j * LB + v * L, acc[v]);                            \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* forward: h_out, c_out (column-major, (H, n)) from x (n, d), h, c (n, H) in layouts x_cm, h_cm,     \
 * c_cm, W (4H, d + H), b (4H) */                                                                     \
void lstm_forward_##SFX(int64_t n, int64_t d, int64_t H, const T *x, int x_cm, const T *h, int h_cm,  \
                        const T *c, int c_cm, const T *W, const T *b, T *h_out, T *c_out,             \
                        int nthreads) {                                                               \
    int64_t K = d + H, nblk = (n + LB - 1) / LB;                                                      \
    _Pragma("omp parallel num_threads(nthreads)")                                                     \
    {                                                                                                 \
        T *Zs = (T *)malloc((size_t)((K + 5 * H) * LB) * sizeof(T)), *Cs = Zs + K * LB, *P = Cs + H * LB; \
        const T **Z = (const T **)malloc((size_t)(K + H) * sizeof(T *)), **C = Z + K;                 \
        _Pragma("omp for schedule(static)")                                                           \
        for (int64_t blk = 0; blk < nblk; blk++) {                                                    \
            int64_t s = blk * LB, m = n - s < LB ? n - s : LB;                                        \
            rows_##SFX(x, x_cm, n, d, s, m, Zs, Z);                                                   \
            rows_##SFX(h, h_cm, n, H, s, m, Zs + d * LB, Z + d);                                      \
            rows_##SFX(c, c_cm, n, H, s, m, Cs, C);                                                   \
            matmul_##SFX(4 * H, K, W, b, Z, P);                                                       \
            for (int64_t k = 0; k < H; k++)                                                           \
                for (int v = 0; v < LB / L; v++) {                                                    \
                    int64_t o = k * LB + v * L;                                                       \
                    V ig = VSIG(VLD(P + o)), fg = VSIG(VLD(P + H * LB + o));                          \
                    V gg = VTANH(VLD(P + 2 * H * LB + o)), og = VSIG(VLD(P + 3 * H * LB + o));        \
                    V cn = fg * VLD(C[k] + v * L) + ig * gg;                                          \
                    VST(P + o, cn);                        /* c' in the rows of i */                  \
                    VST(P + H * LB + o, og * VTANH(cn));   /* h' in the rows of f */                  \
                }                                                                                     \
            put_##SFX(P, H, n, s, m, c_out);                                                          \
            put_##SFX(P + H * LB, H, n, s, m, h_out);                                                 \
        }                                                                                             \
        free(Z);                                                                                      \
        free(Zs);                                                                                     \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* backward given dL/dh' (dh_out) and dL/dc' (dc_out), either NULL for none:                          \
 *   dc_tot = dc' + dh' o (1 - tanh(c')^2)       dc = dc_tot f                                        \
 *   dp = [dc_tot g i(1-i), dc_tot c f(1-f), dc_tot i (1-g^2), dh' tanh(c') o(1-o)]                   \
 *   [dx, dh] = W^T dp     dW = dp z^T     db = sum dp                                                \
 * dx, dh, dc (column-major) may be NULL (not needed); need_w = 0 skips dW and db (outputs,           \
 * overwritten) and does not touch part, else scratch of nsup * (4H K + 4H) values,                   \
 * nsup = ceil(n / (LB SB)). */                                                                       \
void lstm_backward_##SFX(int64_t n, int64_t d, int64_t H, const T *x, int x_cm, const T *h, int h_cm, \
                         const T *c, int c_cm, const T *W, const T *b, const T *dh_out, int dho_cm,   \
                         const T *dc_out, int dco_cm, T *dx, T *dh, T *dc, int need_w, T *dW, T *db,  \
                         T *part, int nthreads) {                                                     \
    int64_t K = d + H, G = 4 * H, nblk = (n + LB - 1) / LB, nsup = (nblk + SB - 1) / SB;              \
    int64_t WS = G * K + G;                                                                           \
    _Pragma("omp parallel num_threads(nthreads)")                                                     \
    {                                                                                                 \
        T *Zs = (T *)malloc((size_t)((2 * K + 8 * H) * LB) * sizeof(T));                               \
        T *Cs = Zs + K * LB, *DHs = Cs + H * LB, *DCs = DHs + H * LB, *DC = DCs + H * LB;           \
        T *P = DC + H * LB, *DZ = P + G * LB;                                                         \
        const T **Z = (const T **)malloc((size_t)(K + 3 * H) * sizeof(T *));                          \
        const T **C = Z + K, **DH = C + H, **DCin = DH + H;                                           \
        /* the super-block's weight-gradient sums, kept per lane until its end */                     \
        T *pv = (T *)malloc((size_t)(WS * L) * sizeof(T));  /* WS vectors, unaligned: VLD/VST */      \
        _Pragma("omp for schedule(static)")                                                           \
        for (int64_t sup = 0; sup < nsup; sup++) {                                                    \
            if (need_w) for (int64_t q = 0; q < WS * L; q++) pv[q] = 0;                               \
            int64_t bend = (sup + 1) * SB < nblk ? (sup + 1) * SB : nblk;                             \
            for (int64_t blk = sup * SB; blk < bend; blk++) {                                         \
                int64_t s = blk * LB, m = n - s < LB ? n - s : LB;                                    \
                rows_##SFX(x, x_cm, n, d, s, m, Zs, Z);                                               \
                rows_##SFX(h, h_cm, n, H, s, m, Zs + d * LB, Z + d);                                  \
                rows_##SFX(c, c_cm, n, H, s, m, Cs, C);                                               \
                rows_##SFX(dh_out, dho_cm, n, H, s, m, DHs, DH);                                      \
                rows_##SFX(dc_out, dco_cm, n, H, s, m, DCs, DCin);                                    \
                matmul_##SFX(G, K, W, b, Z, P);                                                       \
                for (int64_t k = 0; k < H; k++)                                                       \
                    for (int v = 0; v < LB / L; v++) {                                                \
                        int64_t o = k * LB + v * L;                                                   \
                        V ig = VSIG(VLD(P + o)), fg = VSIG(VLD(P + H * LB + o));                      \
                        V gg = VTANH(VLD(P + 2 * H * LB + o)), og = VSIG(VLD(P + 3 * H * LB + o));    \
                        V cp = VLD(C[k] + v * L), dhv = VLD(DH[k] + v * L), one = VBC((T)1);          \
                        V tc = VTANH(fg * cp + ig * gg);                                              \
                        V dct = VLD(DCin[k] + v * L) + dhv * og * (one - tc * tc);                    \
                        VST(DC + o, dct * fg);                                                        \
                        VST(P + o, dct * gg * ig * (one - ig));                                       \
                        VST(P + H * LB + o, dct * cp * fg * (one - fg));                              \
                        VST(P + 2 * H * LB + o, dct * ig * (one - gg * gg));                          \
                        VST(P + 3 * H * LB + o, dhv * tc * og * (one - og));                          \
                    }                                                                                 \
                if (dx || dh) {                                                                       \
                    matmul_t_##SFX(G, K, W, P, DZ);                                                   \
                    if (dx) put_##SFX(DZ, d, n, s, m, dx);                                            \
                    if (dh) put_##SFX(DZ + d * LB, H, n, s, m, dh);                                   \
                }                                                                                     \
                if (dc) put_##SFX(DC, H, n, s, m, dc);                                                \
                if (!need_w) continue;                                                                \
                for (int64_t g = 0; g < G; g++) {                                                     \
                    const T *pg = P + g * LB;                                                         \
                    V sb = VLD(pv + (G * K + g) * L);                                                 \
                    for (int v = 0; v < LB / L; v++) sb += VLD(pg + v * L);                           \
                    VST(pv + (G * K + g) * L, sb);                                                    \
                    int64_t j = 0;                                                                    \
                    for (; j + 4 <= K; j += 4) {                                                      \
                        T *a = pv + (g * K + j) * L;                                                  \
                        V a0 = VLD(a), a1 = VLD(a + L), a2 = VLD(a + 2 * L), a3 = VLD(a + 3 * L);     \
                        for (int v = 0; v < LB / L; v++) {                                            \
                            V p = VLD(pg + v * L);                                                    \
                            a0 += p * VLD(Z[j] + v * L);                                              \
                            a1 += p * VLD(Z[j + 1] + v * L);                                          \
                            a2 += p * VLD(Z[j + 2] + v * L);                                          \
                            a3 += p * VLD(Z[j + 3] + v * L);                                          \
                        }                                                                             \
                        VST(a, a0), VST(a + L, a1), VST(a + 2 * L, a2), VST(a + 3 * L, a3);           \
                    }                                                                                 \
                    for (; j < K; j++) {                                                              \
                        V a0 = VLD(pv + (g * K + j) * L);                                             \
                        for (int v = 0; v < LB / L; v++) a0 += VLD(pg + v * L) * VLD(Z[j] + v * L);   \
                        VST(pv + (g * K + j) * L, a0);                                                \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
            if (need_w) for (int64_t q = 0; q < WS; q++) part[sup * WS + q] = VSUM(VLD(pv + q * L));  \
        }                                                                                             \
        free(pv);                                                                                     \
        free(Z);                                                                                      \
        free(Zs);                                                                                     \
    }                                                                                                 \
    if (!need_w) return;                                                                              \
    for (int64_t q = 0; q < WS; q++) {                                                                \
        T acc = 0;                                                                                    \
        for (int64_t sup = 0; sup < nsup; sup++) acc += part[sup * WS + q];                           \
        if (q < G * K) dW[q] = acc; else db[q - G * K] = acc;                                         \
    }                                                                                                 \
}

LSTM_KERNELS(float, vf, 8, f32, vld, vst, vbc, vsum, vtanh32, vsigmoid32)
LSTM_KERNELS(double, vd, 4, f64, vldd, vstd, vbcd, vsumd, vtanh64, vsigmoid64)

/* the scratch (values) that lstm_backward's part must hold when need_w = 1 */
int64_t lstm_backward_scratch(int64_t n, int64_t d, int64_t H) {
    int64_t nsup = ((n + LB - 1) / LB + SB - 1) / SB;
    return nsup * (4 * H * (d + H) + 4 * H);
}

/* the float32 sigmoid alone, so that its accuracy is tested (tests/test_native.py); n a multiple of 8 */
void lstm_sigmoid_f32(int64_t n, const float *x, float *y) {
    for (int64_t i = 0; i + 8 <= n; i += 8) vst(y + i, vsigmoid32(vld(x + i)));
}
