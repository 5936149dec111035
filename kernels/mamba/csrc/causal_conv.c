/* Depthwise causal conv1d + SiLU, forward and backward, fused for CPU (plain C99 + OpenMP).

   Built and loaded by kernels/native.py, called through ctypes by kernels/mamba/conv.py:

       a_t = bias + sum_k w_k x_{t-(K-1)+k},   y_t = silu(a_t) = a_t sigmoid(a_t)

   per channel, with x_{s<0} taken from `pre` (the previous piece's last K-1 inputs, or zeros).
   Tasks are (batch row, tile of TILE channels); every inner loop runs over the tile's contiguous
   channels. Backward recomputes a_t (K multiply-adds) instead of storing it, scatters
   g_t = dy_t silu'(a_t) to the K inputs that made a_t, and sums dw, dbias per task (the caller
   adds the batch rows).

   Layouts (row-major): x, y, gy, gx [B][T][D]; pre, gpre [B][K-1][D] (row j is input s = j-(K-1));
   wT [K][D]; bias [D] or NULL; gw_part [B][K][D]; gb_part [B][D].
   Axis glossary: B batch, T time, D channels, K conv width. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp2.h"

#define TILE 64

#define DEFINE_CONV(S, SUF, EXP2)                                                                   \
/* the row of input s (s < 0: from pre) */                                                          \
static inline const S *row_##SUF(const S *x, const S *pre, int64_t b, int64_t s, int64_t T,          \
                                 int64_t D, int64_t K) {                                            \
    return s >= 0 ? x + (b * T + s) * D : pre + (b * (K - 1) + (K - 1 + s)) * D;                    \
}                                                                                                   \
                                                                                                    \
/* acc = a_t = bias + sum_k w_k x_{t-(K-1)+k} over the tile */                                  \
static inline void preact_##SUF(S *acc, const S *x, const S *pre, const S *wT, const S *bias,       \
                                int64_t b, int64_t t, int64_t d0, int64_t w, int64_t T, int64_t D,  \
                                int64_t K) {                                                        \
    for (int64_t d = 0; d < w; d++) acc[d] = bias ? bias[d0 + d] : (S)0;                            \
    for (int64_t k = 0; k < K; k++) {                                                               \
        const S *xr = row_##SUF(x, pre, b, t - (K - 1) + k, T, D, K) + d0;                          \
        const S *wk = wT + k * D + d0;                                                              \
        _Pragma("omp simd")                                                                         \
        for (int64_t d = 0; d < w; d++) acc[d] += wk[d] * xr[d];                                    \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
void causal_conv_silu_fwd_##SUF(const S *x, const S *pre, const S *wT, const S *bias, S *y,         \
                                int64_t Bsz, int64_t T, int64_t D, int64_t K, int nthreads) {       \
    const int64_t ntiles = (D + TILE - 1) / TILE;                                                   \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                              \
    for (int64_t task = 0; task < Bsz * ntiles; task++) {                                           \
        const int64_t b = task / ntiles, d0 = (task % ntiles) * TILE;                               \
        const int64_t w = D - d0 < TILE ? D - d0 : TILE;                                            \
        S acc[TILE];                                                                                \
        for (int64_t t = 0; t < T; t++) {                                                           \
            preact_##SUF(acc, x, pre, wT, bias, b, t, d0, w, T, D, K);                              \
            S *yt = y + (b * T + t) * D + d0;                                                       \
            _Pragma("omp simd")                                                                     \
            for (int64_t d = 0; d < w; d++) yt[d] = acc[d] / (1 + EXP2(-acc[d] * (S)LOG2E));        \
        }                                                                                           \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
void causal_conv_silu_bwd_##SUF(const S *x, const S *pre, const S *wT, const S *bias, const S *gy,  \
                                S *gx, S *gpre, S *gw_part, S *gb_part, int64_t Bsz, int64_t T,     \
                                int64_t D, int64_t K, int nthreads) {                               \
    const int64_t ntiles = (D + TILE - 1) / TILE;                                                   \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                              \
    for (int64_t task = 0; task < Bsz * ntiles; task++) {                                           \
        const int64_t b = task / ntiles, d0 = (task % ntiles) * TILE;                               \
        const int64_t w = D - d0 < TILE ? D - d0 : TILE;                                            \
        S acc[TILE], gw[16 * TILE], gb[TILE];                                                       \
        S *gwl = K <= 16 ? gw : (S *)malloc(sizeof(S) * K * TILE);                                  \
        for (int64_t i = 0; i < K * w; i++) gwl[i] = 0;                                             \
        for (int64_t d = 0; d < w; d++) gb[d] = 0;                                                  \
        for (int64_t t = 0; t < T; t++) memset(gx + (b * T + t) * D + d0, 0, sizeof(S) * w);        \
        for (int64_t j = 0; j < K - 1; j++) memset(gpre + (b * (K - 1) + j) * D + d0, 0, sizeof(S) * w); \
        for (int64_t t = 0; t < T; t++) {                                                           \
            preact_##SUF(acc, x, pre, wT, bias, b, t, d0, w, T, D, K);                              \
            /* acc becomes g_t = dy_t silu'(a_t), silu'(a) = s (1 + a (1 - s)) */                  \
            const S *gyt = gy + (b * T + t) * D + d0;                                               \
            _Pragma("omp simd")                                                                     \
            for (int64_t d = 0; d < w; d++) {                                                       \
                const S a = acc[d], s = 1 / (1 + EXP2(-a * (S)LOG2E));                              \
                acc[d] = gyt[d] * s * (1 + a * (1 - s));                                            \
                gb[d] += acc[d];                                                                    \
            }                                                                                       \
            for (int64_t k = 0; k < K; k++) {                                                       \
                const int64_t s = t - (K - 1) + k;                                                  \
                const S *xr = row_##SUF(x, pre, b, s, T, D, K) + d0;                                \
                S *gr = (s >= 0 ? gx + (b * T + s) * D : gpre + (b * (K - 1) + (K - 1 + s)) * D) + d0; \
                const S *wk = wT + k * D + d0;                                                      \
                S *gwk = gwl + k * w;                                                               \
                _Pragma("omp simd")                                                                 \
                for (int64_t d = 0; d < w; d++) {                                                   \
                    gr[d] += wk[d] * acc[d];                                                        \
                    gwk[d] += acc[d] * xr[d];                                                       \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (int64_t k = 0; k < K; k++) memcpy(gw_part + (b * K + k) * D + d0, gwl + k * w, sizeof(S) * w); \
        memcpy(gb_part + b * D + d0, gb, sizeof(S) * w);                                            \
        if (gwl != gw) free(gwl);                                                                   \
    }                                                                                               \
}

DEFINE_CONV(float, f32, exp2_f32)
DEFINE_CONV(double, f64, exp2_f64)
