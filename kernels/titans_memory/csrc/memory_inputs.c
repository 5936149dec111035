/* The Titans memory's inputs from its fused projection, forward and backward, for CPU (plain C99 +
   OpenMP). Built by kernels/native.py, called through ctypes by kernels/titans_memory/inputs.py.

   z [B][T][ldz] holds, per token, the projections of q, k, v (3C = C3 channels, head-major, H heads
   of D) and then the gate logits (3H: theta, eta, alpha). With a depthwise causal conv of width K
   over the C3 channels (wT [K][C3]; inputs before t = 0 from pre [B][K-1][C3]):

       a_t = sum_k wT_k x_{t-(K-1)+k},  u_t = silu(a_t)
       q, k heads: y = u / max(||u||, eps) over each head's D channels;  v = u
       theta = theta_max sigmoid(z_theta + b_theta), eta = sigmoid(z_eta + b_eta),
       alpha = sigmoid(z_alpha + b_alpha)     (gate bias gb [3H] = [b_theta; b_eta; b_alpha], or NULL)

   Outputs: q, k, v [B][T][H][D] and theta, eta, alpha [B][T][H], all contiguous, plus nrm
   [B][T][2H] (the q and k heads' norms, saved for the backward). Backward recomputes a_t and the
   sigmoids, writes da [B][T][C3] (scratch), then gathers dz [B][T][ldz], dpre [B][K-1][C3] and
   per-thread dw_part [nthreads][K][C3] from it (a gather, not a scatter, so rows are independent);
   the gate bias's gradient is the caller's row sum of dz's logit columns.
   Axis glossary: B batch, T time, H heads, D head dim, C3 = 3 H D channels, K conv width. */

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#include "exp2.h"

#define DEFINE_INPUTS(S, SUF, SQRT)                                                                 \
static inline const S *zrow_##SUF(const S *z, const S *pre, int64_t b, int64_t s, int64_t T,         \
                                  int64_t ldz, int64_t C3, int64_t K) {                             \
    return s >= 0 ? z + (b * T + s) * ldz : pre + (b * (K - 1) + (K - 1 + s)) * C3;                 \
}                                                                                                   \
                                                                                                    \
static inline void preact_##SUF(S *a, const S *z, const S *pre, const S *wT, int64_t b, int64_t t,   \
                                int64_t T, int64_t ldz, int64_t C3, int64_t K) {                    \
    for (int64_t c = 0; c < C3; c++) a[c] = 0;                                                      \
    for (int64_t k = 0; k < K; k++) {                                                               \
        const S *xr = zrow_##SUF(z, pre, b, t - (K - 1) + k, T, ldz, C3, K), *wk = wT + k * C3;     \
        _Pragma("omp simd")                                                                         \
        for (int64_t c = 0; c < C3; c++) a[c] += wk[c] * xr[c];                                     \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
/* the row's 3H gate logits: z's, plus the gate bias gb [3H] where given */                         \
static inline void logits_##SUF(S *lg, const S *zl, const S *gb, int64_t H) {                      \
    for (int64_t g = 0; g < 3 * H; g++) lg[g] = gb ? zl[g] + gb[g] : zl[g];                         \
}                                                                                                   \
                                                                                                    \
void memory_inputs_fwd_##SUF(const S *z, const S *pre, const S *wT, const S *gb, int64_t B, int64_t T, \
                             int64_t ldz, int64_t H, int64_t D, int64_t K, double theta_max,        \
                             double eps, S *q, S *k, S *v, S *th, S *et, S *al, S *nrm,             \
                             int nthreads) {                                                        \
    const int64_t C = H * D, C3 = 3 * C;                                                            \
    _Pragma("omp parallel num_threads(nthreads)")                                                   \
    {                                                                                               \
        S a[C3];                                                                                    \
        _Pragma("omp for schedule(static)")                                                         \
        for (int64_t r = 0; r < B * T; r++) {                                                       \
            const int64_t b = r / T, t = r % T;                                                     \
            preact_##SUF(a, z, pre, wT, b, t, T, ldz, C3, K);                                       \
            _Pragma("omp simd")                                                                     \
            for (int64_t c = 0; c < C3; c++) a[c] *= sigmoid_##SUF(a[c]);                           \
            for (int64_t g = 0; g < 2 * H; g++) {                                                   \
                const S *u = a + g * D;                                                             \
                S ss = 0;                                                                           \
                _Pragma("omp simd reduction(+:ss)")                                                 \
                for (int64_t j = 0; j < D; j++) ss += u[j] * u[j];                                  \
                const S n = SQRT(ss), inv = (S)1 / (n > (S)eps ? n : (S)eps);                       \
                nrm[r * 2 * H + g] = n;                                                             \
                S *y = (g < H ? q + r * C + g * D : k + r * C + (g - H) * D);                       \
                _Pragma("omp simd")                                                                 \
                for (int64_t j = 0; j < D; j++) y[j] = u[j] * inv;                                  \
            }                                                                                       \
            memcpy(v + r * C, a + 2 * C, sizeof(S) * C);                                            \
            S lg[3 * H];                                                                            \
            logits_##SUF(lg, z + r * ldz + C3, gb, H);                                              \
            for (int64_t h = 0; h < H; h++) {                                                       \
                th[r * H + h] = (S)theta_max * sigmoid_##SUF(lg[h]);                                \
                et[r * H + h] = sigmoid_##SUF(lg[H + h]);                                           \
                al[r * H + h] = sigmoid_##SUF(lg[2 * H + h]);                                       \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
void memory_inputs_bwd_##SUF(const S *z, const S *pre, const S *wT, const S *gb, int64_t B, int64_t T, \
                             int64_t ldz, int64_t H, int64_t D, int64_t K, double theta_max,        \
                             double eps, const S *q, const S *k, const S *nrm, const S *dq,         \
                             const S *dk, const S *dv, const S *dth, const S *det, const S *dal,    \
                             S *da, S *dz, S *dpre, S *dw_part, int nthreads) {                     \
    const int64_t C = H * D, C3 = 3 * C;                                                            \
    _Pragma("omp parallel num_threads(nthreads)")                                                   \
    {                                                                                               \
        S a[C3], du[C3];                                                                            \
        S *dw = dw_part + (int64_t)omp_get_thread_num() * K * C3;                                   \
        memset(dw, 0, sizeof(S) * K * C3);                                                          \
        /* pass 1: da_t = du_t silu'(a_t) per row; the gate logits' gradients */                  \
        _Pragma("omp for schedule(static)")                                                         \
        for (int64_t r = 0; r < B * T; r++) {                                                       \
            const int64_t b = r / T, t = r % T;                                                     \
            preact_##SUF(a, z, pre, wT, b, t, T, ldz, C3, K);                                       \
            for (int64_t g = 0; g < 2 * H; g++) {                                                   \
                const S *y = g < H ? q + r * C + g * D : k + r * C + (g - H) * D;                   \
                const S *dy = g < H ? dq + r * C + g * D : dk + r * C + (g - H) * D;                \
                const S n = nrm[r * 2 * H + g];                                                     \
                S *d = du + g * D;                                                                  \
                if (n > (S)eps) {                                                                   \
                    S dot = 0;                                                                      \
                    _Pragma("omp simd reduction(+:dot)")                                            \
                    for (int64_t j = 0; j < D; j++) dot += y[j] * dy[j];                            \
                    const S inv = (S)1 / n;                                                         \
                    _Pragma("omp simd")                                                             \
                    for (int64_t j = 0; j < D; j++) d[j] = (dy[j] - y[j] * dot) * inv;              \
                } else {                                                                            \
                    for (int64_t j = 0; j < D; j++) d[j] = dy[j] / (S)eps;                          \
                }                                                                                   \
            }                                                                                       \
            memcpy(du + 2 * C, dv + r * C, sizeof(S) * C);                                          \
            S *dar = da + r * C3;                                                                   \
            _Pragma("omp simd")                                                                     \
            for (int64_t c = 0; c < C3; c++) {                                                      \
                const S s = sigmoid_##SUF(a[c]);                                                    \
                dar[c] = du[c] * s * (1 + a[c] * (1 - s));                                          \
            }                                                                                       \
            S lg[3 * H];                                                                            \
            logits_##SUF(lg, z + r * ldz + C3, gb, H);                                              \
            S *dlg = dz + r * ldz + C3;                                                             \
            for (int64_t h = 0; h < H; h++) {                                                       \
                S s = sigmoid_##SUF(lg[h]);                                                         \
                dlg[h] = dth[r * H + h] * (S)theta_max * s * (1 - s);                               \
                s = sigmoid_##SUF(lg[H + h]);                                                       \
                dlg[H + h] = det[r * H + h] * s * (1 - s);                                          \
                s = sigmoid_##SUF(lg[2 * H + h]);                                                   \
                dlg[2 * H + h] = dal[r * H + h] * s * (1 - s);                                      \
            }                                                                                       \
        }                                                                                           \
        /* pass 2: input row s (s < 0: pre) gathers dx_s = sum_k wT_k da_{s+(K-1)-k}, dw_k += */  \
        _Pragma("omp for schedule(static)")                                                         \
        for (int64_t r = 0; r < B * (T + K - 1); r++) {                                             \
            const int64_t b = r / (T + K - 1), s = r % (T + K - 1) - (K - 1);                       \
            S *dx = s >= 0 ? dz + (b * T + s) * ldz : dpre + (b * (K - 1) + (K - 1 + s)) * C3;      \
            const S *x = zrow_##SUF(z, pre, b, s, T, ldz, C3, K);                                   \
            for (int64_t c = 0; c < C3; c++) dx[c] = 0;                                             \
            for (int64_t kk = 0; kk < K; kk++) {                                                    \
                const int64_t t = s + (K - 1) - kk;                                                 \
                if (t < 0 || t >= T) continue;                                                      \
                const S *dat = da + (b * T + t) * C3, *wk = wT + kk * C3;                           \
                S *dwk = dw + kk * C3;                                                              \
                _Pragma("omp simd")                                                                 \
                for (int64_t c = 0; c < C3; c++) {                                                  \
                    dx[c] += wk[c] * dat[c];                                                        \
                    dwk[c] += dat[c] * x[c];                                                        \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
}

DEFINE_INPUTS(float, f32, sqrtf)
DEFINE_INPUTS(double, f64, sqrt)
