/* Mamba-1 selective scan, forward and backward, fused for CPU (plain C99 + OpenMP).

   Built and loaded by kernels/native.py (gcc -O3 -march=native -fopenmp), called through ctypes
   by kernels/mamba/fused_cpu.py; the math and the backward are derived in ../README.md:

       a_t = exp(delta_t A),   h_t = a_t * h_{t-1} + delta_t u_t B_t,   y_t = sum_n C_{t,n} h_{t,n}
       out_t = (y_t + D u_t) * silu(z_t)      (the D skip and the gate of mamba_ssm's selective_scan_fn)

   Work is split into tasks of (batch row b, tile of TILE channels); a task keeps its state tile
   h[N][w] (channels contiguous, so every inner loop runs over channels and vectorises) in cache
   for the whole sequence. Forward writes y, the final state and a checkpoint of the state every
   K steps (the state before steps 0, K, 2K, ...). Backward walks the K-step blocks from the end:
   it recomputes the block's decays and states from its checkpoint into two block buffers, then runs
   the adjoint g_t = gy_t C_t + a_{t+1} g_{t+1} backwards through the block and forms every
   gradient while the block is in cache. Sums over channels (dB, dC) are per tile; sums over
   batch (dA) are per row; the caller adds the partials.

   Layouts (row-major): u, delta, z, out, gout, du, ddelta, dz [B][T][D]; Dv [D], dD_part [B][D]; Bm, Cm [B][T][N]; A2 = A^T log2(e)
   and At = A^T [N][D]; h0, hT, dh0, dhT, dA_part [B][N][D]; ck [B][nck][N][D], nck = ceil(T/K);
   dB_part, dC_part [ntiles][B][T][N]. h0, dhT and dh0 may be NULL (zero state / not wanted), Dv
   NULL means no skip and z NULL no gate (dz is then not written).
   Axis glossary: B batch, T time, D channels, N state size, K checkpoint interval. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 64

#include "exp2.h"

#define DEFINE_SCAN(S, SUF, EXP2)                                                                  \
void selective_scan_fwd_##SUF(const S *u, const S *delta, const S *A2, const S *Bm, const S *Cm,   \
                              const S *Dv, const S *z, const S *h0, S *y, S *ck, S *hT,            \
                              int64_t Bsz, int64_t T, int64_t D, int64_t N, int64_t K,             \
                              int nthreads) {                                                      \
    const int64_t ntiles = (D + TILE - 1) / TILE, nck = (T + K - 1) / K;                           \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                             \
    for (int64_t task = 0; task < Bsz * ntiles; task++) {                                          \
        const int64_t b = task / ntiles, d0 = (task % ntiles) * TILE;                              \
        const int64_t w = D - d0 < TILE ? D - d0 : TILE;                                           \
        S *h = (S *)malloc(sizeof(S) * N * w);                                                     \
        S du[TILE], acc[TILE];                                                                     \
        for (int64_t n = 0; n < N; n++)                                                            \
            for (int64_t d = 0; d < w; d++)                                                        \
                h[n * w + d] = h0 ? h0[(b * N + n) * D + d0 + d] : (S)0;                           \
        for (int64_t t = 0; t < T; t++) {                                                          \
            if (t % K == 0) {                                                                      \
                S *c = ck + ((b * nck + t / K) * N) * D + d0;                                      \
                for (int64_t n = 0; n < N; n++) memcpy(c + n * D, h + n * w, sizeof(S) * w);       \
            }                                                                                      \
            const int64_t row = b * T + t;                                                         \
            const S *ut = u + row * D + d0, *dt = delta + row * D + d0;                            \
            const S *Bt = Bm + row * N, *Ct = Cm + row * N;                                        \
            for (int64_t d = 0; d < w; d++) { du[d] = dt[d] * ut[d]; acc[d] = 0; }                 \
            for (int64_t n = 0; n < N; n++) {                                                      \
                const S bn = Bt[n], cn = Ct[n];                                                    \
                const S *an = A2 + n * D + d0;                                                     \
                S *hn = h + n * w;                                                                 \
                _Pragma("omp simd")                                                                \
                for (int64_t d = 0; d < w; d++) {                                                  \
                    const S hv = EXP2(dt[d] * an[d]) * hn[d] + du[d] * bn;                         \
                    hn[d] = hv;                                                                    \
                    acc[d] += cn * hv;                                                             \
                }                                                                                  \
            }                                                                                      \
            if (Dv)                                                                                \
                for (int64_t d = 0; d < w; d++) acc[d] += Dv[d0 + d] * ut[d];                      \
            if (z) {                                                                               \
                const S *zt = z + row * D + d0;                                                    \
                _Pragma("omp simd")                                                                \
                for (int64_t d = 0; d < w; d++)                                                    \
                    acc[d] *= zt[d] / (1 + EXP2(-zt[d] * (S)LOG2E));                               \
            }                                                                                      \
            memcpy(y + row * D + d0, acc, sizeof(S) * w);                                          \
        }                                                                                          \
        for (int64_t n = 0; n < N; n++) memcpy(hT + (b * N + n) * D + d0, h + n * w, sizeof(S) * w); \
        free(h);                                                                                   \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
void selective_scan_bwd_##SUF(const S *u, const S *delta, const S *A2, const S *At, const S *Bm,   \
                              const S *Cm, const S *Dv, const S *z, const S *ck, const S *gout,    \
                              const S *dhT, S *du_out, S *ddelta, S *dA_part, S *dB_part,          \
                              S *dC_part, S *dD_part, S *dz, S *dh0, int64_t Bsz, int64_t T,       \
                              int64_t D, int64_t N, int64_t K, int nthreads) {                     \
    const int64_t ntiles = (D + TILE - 1) / TILE, nck = (T + K - 1) / K;                           \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                             \
    for (int64_t task = 0; task < Bsz * ntiles; task++) {                                          \
        const int64_t b = task / ntiles, j = task % ntiles, d0 = j * TILE;                         \
        const int64_t w = D - d0 < TILE ? D - d0 : TILE, plane = N * w;                            \
        /* hb[i] = state before step s+i (hb[0] = checkpoint), ab[i] = decay of step s+i */        \
        S *hb = (S *)malloc(sizeof(S) * (K + 1) * plane);                                          \
        S *ab = (S *)malloc(sizeof(S) * K * plane);                                                \
        S *g = (S *)malloc(sizeof(S) * plane);                                                     \
        S *gA = (S *)calloc(plane, sizeof(S));                                                     \
        S dx[TILE], gdu[TILE], gdl[TILE], gyt[TILE], sg[TILE], ys[TILE], gD[TILE];                 \
        for (int64_t d = 0; d < w; d++) gD[d] = 0;                                                 \
        for (int64_t n = 0; n < N; n++)                                                            \
            for (int64_t d = 0; d < w; d++)                                                        \
                g[n * w + d] = dhT ? dhT[(b * N + n) * D + d0 + d] : (S)0;                         \
        for (int64_t c = nck - 1; c >= 0; c--) {                                                   \
            const int64_t s = c * K, e = s + K < T ? s + K : T;                                    \
            const S *cp = ck + ((b * nck + c) * N) * D + d0;                                       \
            for (int64_t n = 0; n < N; n++) memcpy(hb + n * w, cp + n * D, sizeof(S) * w);         \
            for (int64_t t = s; t < e; t++) {                                                      \
                const int64_t row = b * T + t, i = t - s;                                          \
                const S *ut = u + row * D + d0, *dt = delta + row * D + d0, *Bt = Bm + row * N;    \
                for (int64_t d = 0; d < w; d++) dx[d] = dt[d] * ut[d];                             \
                for (int64_t n = 0; n < N; n++) {                                                  \
                    const S bn = Bt[n];                                                            \
                    const S *an = A2 + n * D + d0, *hp = hb + i * plane + n * w;                   \
                    S *hc = hb + (i + 1) * plane + n * w, *ac = ab + i * plane + n * w;            \
                    _Pragma("omp simd")                                                            \
                    for (int64_t d = 0; d < w; d++) {                                              \
                        const S a = EXP2(dt[d] * an[d]);                                           \
                        ac[d] = a;                                                                 \
                        hc[d] = a * hp[d] + dx[d] * bn;                                            \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            for (int64_t t = e - 1; t >= s; t--) {                                                 \
                const int64_t row = b * T + t, i = t - s;                                          \
                const S *ut = u + row * D + d0, *dt = delta + row * D + d0, *go = gout + row * D + d0; \
                const S *Bt = Bm + row * N, *Ct = Cm + row * N;                                    \
                /* through the gate: dL/dy = gout silu(z) (sg keeps sigmoid(z) for dz below) */    \
                if (z) {                                                                           \
                    const S *zt = z + row * D + d0;                                                \
                    _Pragma("omp simd")                                                            \
                    for (int64_t d = 0; d < w; d++) {                                              \
                        sg[d] = 1 / (1 + EXP2(-zt[d] * (S)LOG2E));                                 \
                        gyt[d] = go[d] * zt[d] * sg[d];                                            \
                    }                                                                              \
                } else {                                                                           \
                    memcpy(gyt, go, sizeof(S) * w);                                                \
                }                                                                                  \
                S *dBt = dB_part + ((j * Bsz) * T + row) * N, *dCt = dC_part + ((j * Bsz) * T + row) * N; \
                for (int64_t d = 0; d < w; d++) {                                                  \
                    dx[d] = dt[d] * ut[d]; gdu[d] = 0; gdl[d] = 0; ys[d] = 0;                      \
                }                                                                                  \
                for (int64_t n = 0; n < N; n++) {                                                  \
                    const S bn = Bt[n], cn = Ct[n];                                                \
                    const S *hc = hb + (i + 1) * plane + n * w, *hp = hb + i * plane + n * w;      \
                    const S *ac = ab + i * plane + n * w, *atn = At + n * D + d0;                  \
                    S *gn = g + n * w, *gAn = gA + n * w;                                          \
                    S sc = 0, sb = 0;                                                              \
                    _Pragma("omp simd reduction(+:sc, sb)")                                        \
                    for (int64_t d = 0; d < w; d++) {                                              \
                        /* g_t: the direct term plus a_{t+1} g_{t+1} (already in gn) */            \
                        const S gv = gn[d] + gyt[d] * cn;                                          \
                        sc += gyt[d] * hc[d];                                                      \
                        ys[d] += cn * hc[d];                                                       \
                        sb += gv * dx[d];                                                          \
                        gdu[d] += gv * bn;                                                         \
                        /* dL/d(delta A) = g_t h_{t-1} a_t */                                      \
                        const S q = gv * hp[d] * ac[d];                                            \
                        gdl[d] += q * atn[d];                                                      \
                        gAn[d] += q * dt[d];                                                       \
                        gn[d] = gv * ac[d];                                                        \
                    }                                                                              \
                    dCt[n] = sc;                                                                   \
                    dBt[n] = sb;                                                                   \
                }                                                                                  \
                S *dut = du_out + row * D + d0, *ddt = ddelta + row * D + d0;                      \
                for (int64_t d = 0; d < w; d++) {                                                  \
                    dut[d] = gdu[d] * dt[d];                                                       \
                    ddt[d] = gdl[d] + gdu[d] * ut[d];                                              \
                }                                                                                  \
                if (Dv)                                                                            \
                    for (int64_t d = 0; d < w; d++) {                                              \
                        dut[d] += gyt[d] * Dv[d0 + d];                                             \
                        gD[d] += gyt[d] * ut[d];                                                   \
                        ys[d] += Dv[d0 + d] * ut[d];                                               \
                    }                                                                              \
                if (z) {                                                                           \
                    /* silu'(z) = s (1 + z (1 - s)), with y recomputed from the block's states */  \
                    const S *zt = z + row * D + d0;                                                \
                    S *dzt = dz + row * D + d0;                                                    \
                    for (int64_t d = 0; d < w; d++)                                                \
                        dzt[d] = go[d] * ys[d] * sg[d] * (1 + zt[d] * (1 - sg[d]));                \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        /* after step 0, g holds a_0 g_0 = dL/dh_{-1} */                                           \
        for (int64_t n = 0; n < N; n++) {                                                          \
            if (dh0) memcpy(dh0 + (b * N + n) * D + d0, g + n * w, sizeof(S) * w);                 \
            memcpy(dA_part + (b * N + n) * D + d0, gA + n * w, sizeof(S) * w);                     \
        }                                                                                          \
        memcpy(dD_part + b * D + d0, gD, sizeof(S) * w);                                           \
        free(hb); free(ab); free(g); free(gA);                                                     \
    }                                                                                              \
}

DEFINE_SCAN(float, f32, exp2_f32)
DEFINE_SCAN(double, f64, exp2_f64)
