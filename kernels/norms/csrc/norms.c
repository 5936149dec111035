/* RMSNorm (optionally times a gate) and l2 normalisation over the last dim, forward and
   backward, fused for CPU (plain C99 + OpenMP). Built by kernels/native.py, called through ctypes
   by kernels/norms/fused_cpu.py; README.md has the math.

       rms_norm:   r = 1 / sqrt(mean_j x_j^2 + eps),   y = x r w (g)
       l2norm:     n = ||x||,   y = x / max(n, eps)

   Rows: the inputs are [O][I][N] with element strides (so, si) for the two leading levels and the
   last dim contiguous, so split or sliced views (a segment of a longer sequence, q and k heads of
   a fused projection) are read in place. Outputs and gradients are contiguous [O*I][N].
   rms_norm_bwd writes dw_part [nthreads][N] (the caller sums it). Tasks: rows, static schedule.
   Axis glossary: O, I leading row levels, N normalised width. */

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define DEFINE_NORMS(S, SUF, SQRT)                                                                  \
void rms_norm_fwd_##SUF(const S *x, int64_t O, int64_t I, int64_t sxo, int64_t sxi, const S *g,      \
                        int64_t sgo, int64_t sgi, const S *w, int64_t N, double eps, S *y, S *rstd,  \
                        int nthreads) {                                                             \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                              \
    for (int64_t r = 0; r < O * I; r++) {                                                           \
        const S *xr = x + (r / I) * sxo + (r % I) * sxi;                                            \
        const S *gr = g ? g + (r / I) * sgo + (r % I) * sgi : NULL;                                 \
        S *yr = y + r * N, ss = 0;                                                                  \
        _Pragma("omp simd reduction(+:ss)")                                                         \
        for (int64_t j = 0; j < N; j++) ss += xr[j] * xr[j];                                        \
        const S rs = (S)1 / SQRT(ss / (S)N + (S)eps);                                               \
        rstd[r] = rs;                                                                               \
        if (gr) {                                                                                   \
            _Pragma("omp simd")                                                                     \
            for (int64_t j = 0; j < N; j++) yr[j] = xr[j] * rs * w[j] * gr[j];                      \
        } else {                                                                                    \
            _Pragma("omp simd")                                                                     \
            for (int64_t j = 0; j < N; j++) yr[j] = xr[j] * rs * w[j];                              \
        }                                                                                           \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
/* dx = r (u - xh mean(u xh)) with u = dy w g and xh = x r; dw += dy g xh; dg = dy xh w */        \
void rms_norm_bwd_##SUF(const S *x, int64_t O, int64_t I, int64_t sxo, int64_t sxi, const S *g,      \
                        int64_t sgo, int64_t sgi, const S *w, int64_t N, const S *rstd, const S *dy, \
                        S *dx, S *dg, S *dw_part, int nthreads) {                                   \
    _Pragma("omp parallel num_threads(nthreads)")                                                   \
    {                                                                                               \
        S *dw = dw_part + (int64_t)omp_get_thread_num() * N;                                        \
        memset(dw, 0, sizeof(S) * N);                                                               \
        _Pragma("omp for schedule(static)")                                                         \
        for (int64_t r = 0; r < O * I; r++) {                                                       \
            const S *xr = x + (r / I) * sxo + (r % I) * sxi;                                        \
            const S *gr = g ? g + (r / I) * sgo + (r % I) * sgi : NULL;                             \
            const S *dyr = dy + r * N;                                                              \
            S *dxr = dx + r * N;                                                                    \
            const S rs = rstd[r];                                                                   \
            S dot = 0;                                                                              \
            if (gr) {                                                                               \
                S *dgr = dg + r * N;                                                                \
                _Pragma("omp simd reduction(+:dot)")                                                \
                for (int64_t j = 0; j < N; j++) {                                                   \
                    const S xh = xr[j] * rs, dyg = dyr[j] * gr[j];                                  \
                    dgr[j] = dyr[j] * xh * w[j];                                                    \
                    dw[j] += dyg * xh;                                                              \
                    dot += dyg * w[j] * xh;                                                         \
                }                                                                                   \
                dot /= (S)N;                                                                        \
                _Pragma("omp simd")                                                                 \
                for (int64_t j = 0; j < N; j++) {                                                   \
                    const S xh = xr[j] * rs;                                                        \
                    dxr[j] = rs * (dyr[j] * gr[j] * w[j] - xh * dot);                               \
                }                                                                                   \
            } else {                                                                                \
                _Pragma("omp simd reduction(+:dot)")                                                \
                for (int64_t j = 0; j < N; j++) {                                                   \
                    const S xh = xr[j] * rs;                                                        \
                    dw[j] += dyr[j] * xh;                                                           \
                    dot += dyr[j] * w[j] * xh;                                                      \
                }                                                                                   \
                dot /= (S)N;                                                                        \
                _Pragma("omp simd")                                                                 \
                for (int64_t j = 0; j < N; j++) {                                                   \
                    const S xh = xr[j] * rs;                                                        \
                    dxr[j] = rs * (dyr[j] * w[j] - xh * dot);                                       \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
void l2norm_fwd_##SUF(const S *x, int64_t O, int64_t I, int64_t so, int64_t si, int64_t N,          \
                      double eps, S *y, S *norm, int nthreads) {                                    \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                              \
    for (int64_t r = 0; r < O * I; r++) {                                                           \
        const S *xr = x + (r / I) * so + (r % I) * si;                                              \
        S *yr = y + r * N, ss = 0;                                                                  \
        _Pragma("omp simd reduction(+:ss)")                                                         \
        for (int64_t j = 0; j < N; j++) ss += xr[j] * xr[j];                                        \
        const S n = SQRT(ss), inv = (S)1 / (n > (S)eps ? n : (S)eps);                               \
        norm[r] = n;                                                                                \
        _Pragma("omp simd")                                                                         \
        for (int64_t j = 0; j < N; j++) yr[j] = xr[j] * inv;                                        \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
/* n > eps: dx = (dy - y (y . dy)) / n;  else (y = x / eps, linear): dx = dy / eps */             \
void l2norm_bwd_##SUF(const S *y, const S *norm, const S *dy, int64_t R, int64_t N, double eps,     \
                      S *dx, int nthreads) {                                                        \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                              \
    for (int64_t r = 0; r < R; r++) {                                                               \
        const S *yr = y + r * N, *dyr = dy + r * N;                                                 \
        S *dxr = dx + r * N;                                                                        \
        const S n = norm[r];                                                                        \
        if (n > (S)eps) {                                                                           \
            S dot = 0;                                                                              \
            _Pragma("omp simd reduction(+:dot)")                                                    \
            for (int64_t j = 0; j < N; j++) dot += yr[j] * dyr[j];                                  \
            const S inv = (S)1 / n;                                                                 \
            _Pragma("omp simd")                                                                     \
            for (int64_t j = 0; j < N; j++) dxr[j] = (dyr[j] - yr[j] * dot) * inv;                  \
        } else {                                                                                    \
            const S inv = (S)1 / (S)eps;                                                            \
            for (int64_t j = 0; j < N; j++) dxr[j] = dyr[j] * inv;                                  \
        }                                                                                           \
    }                                                                                               \
}

DEFINE_NORMS(float, f32, sqrtf)
DEFINE_NORMS(double, f64, sqrt)
