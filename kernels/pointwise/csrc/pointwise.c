/* SwiGLU's gating product and rotary position embeddings, forward and backward, fused for CPU
   (plain C99 + OpenMP). Built by kernels/native.py, called through ctypes by
   kernels/pointwise/fused_cpu.py; README.md has the math.

       swiglu:  y = silu(a) b = a s b,  s = sigmoid(a)
                da = dy b s (1 + a (1 - s)),   db = dy a s
       rope:    for i < D/2, with c = cos[t][i], n = sign * sin[t][i]:
                y_i = x_i c - x_{i+D/2} n,   y_{i+D/2} = x_{i+D/2} c + x_i n
                (sign = +1 rotates; the backward is the same loop on dy with sign = -1, the
                inverse rotation)

   swiglu reads and writes contiguous [n]. rope reads x [B][T][H][D] through element strides
   (sb, st, sh) with the last dim contiguous (a head slice of a fused projection is read in place),
   the table cs [T][2][D/2] (cos row, then sin row) contiguous, and writes y contiguous [B][T][H][D].
   Tasks: elements (swiglu) and (b, t) rows (rope), static schedule.
   Axis glossary: B batch, T time, H heads, D head dim. */

#include <math.h>
#include <stdint.h>
#include <omp.h>

#include "exp2.h"

#define SWIGLU_BLOCK 1024

#define DEFINE_POINTWISE(S, SUF)                                                              \
void swiglu_fwd_##SUF(const S *a, const S *b, int64_t n, S *y, int nthreads) {                      \
    _Pragma("omp parallel for simd num_threads(nthreads) schedule(static)")                         \
    for (int64_t i = 0; i < n; i++) y[i] = a[i] * sigmoid_##SUF(a[i]) * b[i];                       \
}                                                                                                   \
                                                                                                    \
/* In blocks: the sigmoids into a buffer in L1, then the products. One loop doing both ran ~4.5x  \
   slower on AVX-512 (Sapphire Rapids, gcc 12: 4.7 against 1.0 ms for 1.4M floats), stalled on its  \
   loads; the split loops stream at memory speed. */                                                \
void swiglu_bwd_##SUF(const S *a, const S *b, const S *dy, int64_t n, S *da, S *db, int nthreads) { \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                              \
    for (int64_t i0 = 0; i0 < n; i0 += SWIGLU_BLOCK) {                                              \
        S sb[SWIGLU_BLOCK] __attribute__((aligned(64)));                                            \
        const int64_t m = n - i0 < SWIGLU_BLOCK ? n - i0 : SWIGLU_BLOCK;                            \
        const S *ai = a + i0, *bi = b + i0, *dyi = dy + i0;                                         \
        S *dai = da + i0, *dbi = db + i0;                                                           \
        _Pragma("omp simd")                                                                         \
        for (int64_t i = 0; i < m; i++) sb[i] = sigmoid_##SUF(ai[i]);                               \
        _Pragma("omp simd")                                                                         \
        for (int64_t i = 0; i < m; i++) {                                                           \
            const S s = sb[i], as = ai[i] * s;                                                      \
            dbi[i] = dyi[i] * as;                                                                   \
            dai[i] = dyi[i] * bi[i] * (s + as * (1 - s));                                           \
        }                                                                                           \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
void rope_##SUF(const S *x, int64_t B, int64_t T, int64_t H, int64_t D, int64_t sb, int64_t st,    \
                int64_t sh, const S *cs, int sign, S *y, int nthreads) {                            \
    const int64_t half = D / 2;                                                                     \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                              \
    for (int64_t r = 0; r < B * T; r++) {                                                           \
        const int64_t bi = r / T, t = r % T;                                                        \
        const S *c = cs + t * D, *sn_t = c + half; /* cos [D/2], sin [D/2] */                   \
        for (int64_t h = 0; h < H; h++) {                                                           \
            const S *xr = x + bi * sb + t * st + h * sh;                                            \
            S *yr = y + (r * H + h) * D;                                                            \
            _Pragma("omp simd")                                                                     \
            for (int64_t i = 0; i < half; i++) {                                                    \
                const S co = c[i], sn = sign * sn_t[i], x1 = xr[i], x2 = xr[i + half];              \
                yr[i] = x1 * co - x2 * sn;                                                          \
                yr[i + half] = x2 * co + x1 * sn;                                                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
}

DEFINE_POINTWISE(float, f32)
DEFINE_POINTWISE(double, f64)
