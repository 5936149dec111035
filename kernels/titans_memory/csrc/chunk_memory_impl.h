/* Body of chunk_memory.c for one scalar type: included once with S = float (SUF _f32) and once
   with S = double (_f64). See chunk_memory.c for the math and layouts. */

#define MAXL 16

typedef S SUF(vec) __attribute__((vector_size(64)));
/* the same vector at element alignment: loads and stores of it are unaligned moves */
typedef S SUF(uvec) __attribute__((vector_size(64), aligned(sizeof(S))));
#define VEC SUF(vec)
#define UVEC SUF(uvec)
#define NV ((int64_t)(64 / sizeof(S)))

/* C[R rows][NVB*NV cols] = beta C + alpha A B over k, accumulators in registers. A points at the
   block's first row (row stride ars, column stride acs), B and C at its first column. */
#define DEFINE_BLOCK(R, NVB)                                                                      \
static inline void SUF(block_##R##_##NVB)(int64_t k, S alpha, const S *A, int64_t ars, int64_t acs, \
                                          const S *B, int64_t ldb, S beta, S *C, int64_t ldc) {   \
    VEC acc[R][NVB];                                                                              \
    for (int r = 0; r < R; r++)                                                                   \
        for (int u = 0; u < NVB; u++) acc[r][u] = (VEC){0};                                       \
    for (int64_t kk = 0; kk < k; kk++) {                                                          \
        VEC bv[NVB];                                                                              \
        for (int u = 0; u < NVB; u++) bv[u] = *(const UVEC *)(B + kk * ldb + u * NV);             \
        for (int r = 0; r < R; r++) {                                                             \
            const S a = A[r * ars + kk * acs];                                                    \
            for (int u = 0; u < NVB; u++) acc[r][u] += a * bv[u];                                 \
        }                                                                                         \
    }                                                                                             \
    for (int r = 0; r < R; r++)                                                                   \
        for (int u = 0; u < NVB; u++) {                                                           \
            UVEC *c = (UVEC *)(C + r * ldc + u * NV);                                             \
            *c = beta != 0 ? beta * *c + alpha * acc[r][u] : alpha * acc[r][u];                   \
        }                                                                                         \
}

DEFINE_BLOCK(4, 4)
DEFINE_BLOCK(4, 1)
DEFINE_BLOCK(1, 4)
DEFINE_BLOCK(1, 1)
#undef DEFINE_BLOCK

/* C[m][n] (row stride ldc) = beta C + alpha A B, A [m][k] read at A[i ars + kk acs], B [k][n]
   (row stride ldb). beta == 0 does not read C. */
static void SUF(gemm)(int64_t m, int64_t n, int64_t k, S alpha, const S *A, int64_t ars, int64_t acs,
                      const S *B, int64_t ldb, S beta, S *C, int64_t ldc) {
    const int64_t nb4 = n / (4 * NV) * (4 * NV), nb1 = n / NV * NV;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        int64_t j = 0;
        for (; j < nb4; j += 4 * NV)
            SUF(block_4_4)(k, alpha, A + i * ars, ars, acs, B + j, ldb, beta, C + i * ldc + j, ldc);
        for (; j < nb1; j += NV)
            SUF(block_4_1)(k, alpha, A + i * ars, ars, acs, B + j, ldb, beta, C + i * ldc + j, ldc);
    }
    for (; i < m; i++) {
        int64_t j = 0;
        for (; j < nb4; j += 4 * NV)
            SUF(block_1_4)(k, alpha, A + i * ars, ars, acs, B + j, ldb, beta, C + i * ldc + j, ldc);
        for (; j < nb1; j += NV)
            SUF(block_1_1)(k, alpha, A + i * ars, ars, acs, B + j, ldb, beta, C + i * ldc + j, ldc);
    }
    /* the last n % NV columns of every row */
    for (int64_t r = 0; r < m; r++)
        for (int64_t j = nb1; j < n; j++) {
            S s = 0;
            for (int64_t kk = 0; kk < k; kk++) s += A[r * ars + kk * acs] * B[kk * ldb + j];
            S *c = C + r * ldc + j;
            *c = beta != 0 ? beta * *c + alpha * s : alpha * s;
        }
}

/* dst [c][r] = src [r][c]^T. Full NV x NV tiles go through registers: log2(NV) rounds of
   two-vector shuffles, round s swapping bit s of the row and column index (64 shuffles per 16 x 16
   float tile, against 256 scalar moves); the edges are scalar. */
typedef int32_t SUF(ivec) __attribute__((vector_size(64 * sizeof(int32_t) / sizeof(S))));
typedef int64_t SUF(lvec) __attribute__((vector_size(64)));
#define MASKVEC __typeof__(__builtin_choose_expr(sizeof(S) == 4, (SUF(ivec)){0}, (SUF(lvec)){0}))
static void SUF(transpose)(const S *src, int64_t r, int64_t c, S *dst) {
    static int init = 0;
    static MASKVEC lo[8], hi[8];
    if (!init) {  /* masks of round s: lo keeps row i's low half of each 2s block, hi the high */
        for (int e = 0, st = 1; st < NV; e++, st *= 2)
            for (int j = 0; j < NV; j++) {
                lo[e][j] = (j & st) ? NV + j - st : j;
                hi[e][j] = (j & st) ? NV + j : j + st;
            }
        init = 1;
    }
    const int64_t rt = r / NV * NV, ct = c / NV * NV;
    for (int64_t i0 = 0; i0 < rt; i0 += NV)
        for (int64_t j0 = 0; j0 < ct; j0 += NV) {
            VEC v[NV];
            for (int i = 0; i < NV; i++) v[i] = *(const UVEC *)(src + (i0 + i) * c + j0);
            for (int e = 0, st = 1; st < NV; e++, st *= 2)
                for (int i = 0; i < NV; i++)
                    if (!(i & st)) {
                        const VEC a = v[i], b2 = v[i + st];
                        v[i] = __builtin_shuffle(a, b2, lo[e]);
                        v[i + st] = __builtin_shuffle(a, b2, hi[e]);
                    }
            for (int j = 0; j < NV; j++) *(UVEC *)(dst + (j0 + j) * r + i0) = v[j];
        }
    for (int64_t i = 0; i < r; i++)
        for (int64_t j = (i < rt ? ct : 0); j < c; j++) dst[j * r + i] = src[i * c + j];
}
#undef MASKVEC

/* act(z) (f), act'(z) (d1), act''(z) (d2) of silu (act 0) or exact gelu (act 1); f or d2 may be NULL.
   One loop per case, so each vectorises. */
static void SUF(activation)(int act, const S *z, int64_t n, S *f, S *d1, S *d2) {
#define SILU_S const S x = z[i], s = (S)1 / ((S)1 + EXP(-x))
#define GELU_S const S x = z[i], phi = EXP((S)-0.5 * x * x) * (S)0.3989422804014327, \
                   cdf = (S)0.5 * ((S)1 + ERF(x * (S)0.7071067811865476))
    if (act == 0) {
        if (f) {
            _Pragma("omp simd") for (int64_t i = 0; i < n; i++) { SILU_S; f[i] = x * s; }
        } else if (d2) {
            _Pragma("omp simd") for (int64_t i = 0; i < n; i++) {
                SILU_S;
                d1[i] = s * ((S)1 + x * ((S)1 - s));
                d2[i] = s * ((S)1 - s) * ((S)2 + x * ((S)1 - (S)2 * s));
            }
        } else {
            _Pragma("omp simd") for (int64_t i = 0; i < n; i++) { SILU_S; d1[i] = s * ((S)1 + x * ((S)1 - s)); }
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            GELU_S;
            if (f) f[i] = x * cdf;
            if (d1) d1[i] = cdf + x * phi;
            if (d2) d2[i] = phi * ((S)2 - x * x);
        }
    }
#undef SILU_S
#undef GELU_S
}

/* Per-task scratch: a bump allocator over one block. */
typedef struct { S *p; } SUF(arena);
static S *SUF(take)(SUF(arena) *a, int64_t n) { S *r = a->p; a->p += (n + 15) / 16 * 16; return r; }

/* The chunk's forward from W: X[l] [2b][w_l] (rows 0..b-1 the queries, b..2b-1 the keys),
   Z[l] [2b][w_{l+1}], delta[l], P[l] [b][w_{l+1}] (key rows; P only for l < L-1), WT scratch. */
static void SUF(chunk_forward)(int64_t L, const int64_t *w, int64_t b, int act, const S *q, const S *k,
                               const S *v, S *const *W, S **X, S **Z, S **delta, S **P, S *WT) {
    memcpy(X[0], q, sizeof(S) * b * w[0]);
    memcpy(X[0] + b * w[0], k, sizeof(S) * b * w[0]);
    for (int64_t l = 0; l < L; l++) {
        SUF(gemm)(2 * b, w[l + 1], w[l], 1, X[l], w[l], 1, W[l], w[l + 1], 0, Z[l], w[l + 1]);
        if (l < L - 1) SUF(activation)(act, Z[l], 2 * b * w[l + 1], X[l + 1], NULL, NULL);
    }
    const S *zk = Z[L - 1] + b * w[L];
    for (int64_t i = 0; i < b * w[L]; i++) delta[L - 1][i] = 2 * (zk[i] - v[i]);
    for (int64_t l = L - 2; l >= 0; l--) {
        /* P_l = delta_{l+1} W_{l+1}^T, delta_l = P_l act'(z_l) */
        SUF(transpose)(W[l + 1], w[l + 1], w[l + 2], WT);
        SUF(gemm)(b, w[l + 1], w[l + 2], 1, delta[l + 1], w[l + 2], 1, WT, w[l + 1], 0, P[l], w[l + 1]);
        SUF(activation)(act, Z[l] + b * w[l + 1], b * w[l + 1], NULL, delta[l], NULL);
        for (int64_t i = 0; i < b * w[l + 1]; i++) delta[l][i] *= P[l][i];
    }
}

void SUF(titans_chunk_fwd)(const S *q, const S *k, const S *v, const S *cM0, const S *cS0M, const S *cS0S,
                           const S *c, const int64_t *w, int64_t L, S *const *W0, S *const *S0, S *const *Wout,
                           S *const *Sout, S *const *Wst, S *const *Sst, S *o, int64_t BH, int64_t N,
                           int64_t b, int act, int nthreads) {
    int64_t wmax = 0, sz[MAXL];
    for (int64_t l = 0; l <= L; l++) wmax = w[l] > wmax ? w[l] : wmax;
    for (int64_t l = 0; l < L; l++) sz[l] = w[l] * w[l + 1];
    const int64_t scratch = 8 * (L + 2) * (2 * b * wmax + 16) + wmax * wmax + 64;
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")
    for (int64_t t = 0; t < BH; t++) {
        S *block = (S *)malloc(sizeof(S) * scratch);
        SUF(arena) a = {block};
        S *X[MAXL], *Z[MAXL], *delta[MAXL], *P[MAXL], *Wc[MAXL], *Sc[MAXL];
        for (int64_t l = 0; l < L; l++) {
            X[l] = SUF(take)(&a, 2 * b * w[l]);
            Z[l] = SUF(take)(&a, 2 * b * w[l + 1]);
            delta[l] = SUF(take)(&a, b * w[l + 1]);
            P[l] = SUF(take)(&a, b * w[l + 1]);
        }
        S *WT = SUF(take)(&a, wmax * wmax), *cd = SUF(take)(&a, 2 * b * wmax);
        for (int64_t l = 0; l < L; l++) {
            Wc[l] = Wout[l] + t * sz[l];
            Sc[l] = Sout[l] + t * sz[l];
            memcpy(Wc[l], W0[l] + t * sz[l], sizeof(S) * sz[l]);
            if (S0) memcpy(Sc[l], S0[l] + t * sz[l], sizeof(S) * sz[l]);
            else memset(Sc[l], 0, sizeof(S) * sz[l]);
        }
        for (int64_t n = 0; n < N; n++) {
            const int64_t row = t * N * b + n * b, tn = t * N + n;
            SUF(chunk_forward)(L, w, b, act, q + row * w[0], k + row * w[0], v + row * w[L], Wc, X, Z, delta, P, WT);
            memcpy(o + row * w[L], Z[L - 1], sizeof(S) * b * w[L]);
            const S am = cM0[tn], bm = cS0M[tn], bs = cS0S[tn];
            const S *cn = c + tn * b * 2;
            for (int64_t l = 0; l < L; l++) {
                const int64_t d = w[l + 1];
                S *cdM = cd, *cdS = cd + b * d;
                for (int64_t i = 0; i < b; i++)
                    for (int64_t j = 0; j < d; j++) {
                        cdM[i * d + j] = cn[2 * i] * delta[l][i * d + j];
                        cdS[i * d + j] = cn[2 * i + 1] * delta[l][i * d + j];
                    }
                /* save the chunk-start state for the backward while scaling it, in one pass */
                S *ws = Wst[l] + tn * sz[l], *ss = Sst[l] + tn * sz[l], *wc = Wc[l], *sc = Sc[l];
                _Pragma("omp simd")
                for (int64_t e = 0; e < sz[l]; e++) {
                    const S we = wc[e], se = sc[e];
                    ws[e] = we;
                    ss[e] = se;
                    wc[e] = am * we + bm * se;
                    sc[e] = bs * se;
                }
                /* W -= x^T (c_M delta), S -= x^T (c_S delta); x^T read through strides */
                const S *xk = X[l] + b * w[l];
                SUF(gemm)(w[l], d, b, -1, xk, 1, w[l], cdM, d, 1, Wc[l], d);
                SUF(gemm)(w[l], d, b, -1, xk, 1, w[l], cdS, d, 1, Sc[l], d);
            }
        }
        free(block);
    }
}

/* Gradients of titans_chunk_fwd. do_ [BH][T][D_L]; dWf, dSf: gradients of the final state (NULL:
   zero). Writes dq, dk [BH][T][D_0], dv [BH][T][D_L], dcM0, dcS0M, dcS0S [BH][N], dc [BH][N][b][2],
   dW0[l], dS0[l] [BH][w_l][w_{l+1}]. */
void SUF(titans_chunk_bwd)(const S *q, const S *k, const S *v, const S *cM0, const S *cS0M, const S *cS0S,
                           const S *c, const int64_t *w, int64_t L, S *const *Wst, S *const *Sst, const S *do_,
                           S *const *dWf, S *const *dSf, S *dq, S *dk, S *dv, S *dcM0, S *dcS0M, S *dcS0S, S *dc,
                           S *const *dW0, S *const *dS0, int64_t BH, int64_t N, int64_t b, int act, int nthreads) {
    int64_t wmax = 0, sz[MAXL], szsum = 0;
    for (int64_t l = 0; l <= L; l++) wmax = w[l] > wmax ? w[l] : wmax;
    for (int64_t l = 0; l < L; l++) { sz[l] = w[l] * w[l + 1]; szsum += sz[l] + 16; }
    const int64_t scratch = 16 * (L + 2) * (2 * b * wmax + 16) + 4 * szsum + (L + 2) * (wmax * wmax + 16) + 64;
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")
    for (int64_t t = 0; t < BH; t++) {
        S *block = (S *)malloc(sizeof(S) * scratch);
        SUF(arena) a = {block};
        S *X[MAXL], *Z[MAXL], *delta[MAXL], *P[MAXL], *WT[MAXL], *ddelta[MAXL], *dA[MAXL], *dz[MAXL];
        S *dWc[MAXL], *dSc[MAXL], *dWp[MAXL], *dSp[MAXL];
        for (int64_t l = 0; l < L; l++) {
            X[l] = SUF(take)(&a, 2 * b * w[l]);
            Z[l] = SUF(take)(&a, 2 * b * w[l + 1]);
            delta[l] = SUF(take)(&a, b * w[l + 1]);
            P[l] = SUF(take)(&a, b * w[l + 1]);
            ddelta[l] = SUF(take)(&a, b * w[l + 1]);
            dz[l] = SUF(take)(&a, b * w[l + 1]);
            dA[l] = SUF(take)(&a, b * w[l]);
            WT[l] = SUF(take)(&a, sz[l]);
            dWc[l] = SUF(take)(&a, sz[l]);
            dSc[l] = SUF(take)(&a, sz[l]);
            dWp[l] = SUF(take)(&a, sz[l]);
            dSp[l] = SUF(take)(&a, sz[l]);
        }
        S *T1 = SUF(take)(&a, wmax * wmax), *WTf = SUF(take)(&a, wmax * wmax);
        S *g1 = SUF(take)(&a, 2 * b * wmax), *g2 = SUF(take)(&a, 2 * b * wmax);
        S *cd = SUF(take)(&a, 2 * b * wmax), *d1 = SUF(take)(&a, b * wmax), *dcn = SUF(take)(&a, 2 * b);
        for (int64_t l = 0; l < L; l++) {
            if (dWf && dWf[l]) memcpy(dWc[l], dWf[l] + t * sz[l], sizeof(S) * sz[l]);
            else memset(dWc[l], 0, sizeof(S) * sz[l]);
            if (dSf && dSf[l]) memcpy(dSc[l], dSf[l] + t * sz[l], sizeof(S) * sz[l]);
            else memset(dSc[l], 0, sizeof(S) * sz[l]);
        }
        for (int64_t n = N - 1; n >= 0; n--) {
            const int64_t row = t * N * b + n * b, tn = t * N + n;
            S *W[MAXL], *Sm[MAXL];
            for (int64_t l = 0; l < L; l++) { W[l] = Wst[l] + tn * sz[l]; Sm[l] = Sst[l] + tn * sz[l]; }
            SUF(chunk_forward)(L, w, b, act, q + row * w[0], k + row * w[0], v + row * w[L], W, X, Z, delta, P, WTf);
            for (int64_t l = 0; l < L; l++) SUF(transpose)(W[l], w[l], w[l + 1], WT[l]);
            /* scalar coefficients: d a = <dW', W>, d b_M = <dW', S>, d b_S = <dS', S> */
            /* and the linear part of the update: dW = a dW' + ..., dS = b_S dS' + b_M dW' */
            const S am = cM0[tn], bm = cS0M[tn], bs = cS0S[tn];
            const S *cn = c + tn * b * 2;
            S sa = 0, sbm = 0, sbs = 0;
            for (int64_t l = 0; l < L; l++) {
                const S *gw = dWc[l], *gs = dSc[l], *wl = W[l], *sl = Sm[l];
                S *pw = dWp[l], *ps = dSp[l];
                _Pragma("omp simd reduction(+:sa, sbm, sbs)")
                for (int64_t e = 0; e < sz[l]; e++) {
                    sa += gw[e] * wl[e];
                    sbm += gw[e] * sl[e];
                    sbs += gs[e] * sl[e];
                    pw[e] = am * gw[e];
                    ps[e] = bs * gs[e] + bm * gw[e];
                }
            }
            dcM0[tn] = sa; dcS0M[tn] = sbm; dcS0S[tn] = sbs;
            /* read path o = M(q) at W: dW_l += xq_l^T dZq, dXq = dZq W_l^T */
            {
                S *dZq = g1, *dXq = g2;
                memcpy(dZq, do_ + row * w[L], sizeof(S) * b * w[L]);
                for (int64_t l = L - 1; l >= 0; l--) {
                    SUF(gemm)(w[l], w[l + 1], b, 1, X[l], 1, w[l], dZq, w[l + 1], 1, dWp[l], w[l + 1]);
                    S *out = l ? dXq : dq + row * w[0];
                    SUF(gemm)(b, w[l], w[l + 1], 1, dZq, w[l + 1], 1, WT[l], w[l], 0, out, w[l]);
                    if (l) {
                        SUF(activation)(act, Z[l - 1], b * w[l], NULL, d1, NULL);
                        for (int64_t i = 0; i < b * w[l]; i++) dZq[i] = dXq[i] * d1[i];
                    }
                }
            }
            /* through the update: G_M = x^T (c_M delta), G_S = x^T (c_S delta), dG = -dW', -dS' */
            for (int64_t i = 0; i < 2 * b; i++) dcn[i] = 0;
            for (int64_t l = 0; l < L; l++) {
                const int64_t d = w[l + 1];
                const S *xk = X[l] + b * w[l];
                S *AM = g1, *AS = g2;
                SUF(gemm)(b, d, w[l], -1, xk, w[l], 1, dWc[l], d, 0, AM, d);
                SUF(gemm)(b, d, w[l], -1, xk, w[l], 1, dSc[l], d, 0, AS, d);
                for (int64_t i = 0; i < b; i++) {
                    S sM = 0, sS = 0;
                    const S cm = cn[2 * i], cs = cn[2 * i + 1];
                    _Pragma("omp simd reduction(+:sM, sS)")
                    for (int64_t j = 0; j < d; j++) {
                        const S dl = delta[l][i * d + j];
                        sM += AM[i * d + j] * dl;
                        sS += AS[i * d + j] * dl;
                        ddelta[l][i * d + j] = cm * AM[i * d + j] + cs * AS[i * d + j];
                    }
                    dcn[2 * i] += sM;
                    dcn[2 * i + 1] += sS;
                }
                /* dA = -(c_M delta) dW'^T - (c_S delta) dS'^T */
                S *cdM = cd, *cdS = cd + b * d;
                for (int64_t i = 0; i < b; i++)
                    for (int64_t j = 0; j < d; j++) {
                        cdM[i * d + j] = cn[2 * i] * delta[l][i * d + j];
                        cdS[i * d + j] = cn[2 * i + 1] * delta[l][i * d + j];
                    }
                SUF(transpose)(dWc[l], w[l], d, T1);
                SUF(gemm)(b, w[l], d, -1, cdM, d, 1, T1, w[l], 0, dA[l], w[l]);
                SUF(transpose)(dSc[l], w[l], d, T1);
                SUF(gemm)(b, w[l], d, -1, cdS, d, 1, T1, w[l], 1, dA[l], w[l]);
            }
            memcpy(dc + tn * b * 2, dcn, sizeof(S) * 2 * b);
            /* inner backprop delta_l = P_l act'(z_l), P_l = delta_{l+1} W_{l+1}^T, differentiated */
            for (int64_t l = 0; l < L - 1; l++) {
                const int64_t d = w[l + 1];
                const S *zk = Z[l] + b * d;
                S *d2 = cd;
                SUF(activation)(act, zk, b * d, NULL, d1, d2);
                S *dP = g1;
                for (int64_t i = 0; i < b * d; i++) {
                    dP[i] = ddelta[l][i] * d1[i];
                    dz[l][i] = ddelta[l][i] * P[l][i] * d2[i];
                }
                SUF(gemm)(b, w[l + 2], d, 1, dP, d, 1, W[l + 1], w[l + 2], 1, ddelta[l + 1], w[l + 2]);
                SUF(gemm)(d, w[l + 2], b, 1, dP, 1, d, delta[l + 1], w[l + 2], 1, dWp[l + 1], w[l + 2]);
            }
            /* delta_{L-1} = 2 (z_{L-1} - v) */
            for (int64_t i = 0; i < b * w[L]; i++) {
                dz[L - 1][i] = 2 * ddelta[L - 1][i];
                dv[row * w[L] + i] = -2 * ddelta[L - 1][i];
            }
            /* key forward z_l = x_l W_l, x_{l+1} = act(z_l) */
            {
                S *dZ = dz[L - 1], *dX = g2;
                for (int64_t l = L - 1; l >= 0; l--) {
                    const S *xk = X[l] + b * w[l];
                    SUF(gemm)(w[l], w[l + 1], b, 1, xk, 1, w[l], dZ, w[l + 1], 1, dWp[l], w[l + 1]);
                    S *out = l ? dX : dk + row * w[0];
                    memcpy(out, dA[l], sizeof(S) * b * w[l]);
                    SUF(gemm)(b, w[l], w[l + 1], 1, dZ, w[l + 1], 1, WT[l], w[l], 1, out, w[l]);
                    if (l) {
                        SUF(activation)(act, Z[l - 1] + b * w[l], b * w[l], NULL, d1, NULL);
                        S *nz = g1;
                        for (int64_t i = 0; i < b * w[l]; i++) nz[i] = dz[l - 1][i] + dX[i] * d1[i];
                        dZ = nz;
                    }
                }
            }
            for (int64_t l = 0; l < L; l++) {
                S *tmp = dWc[l]; dWc[l] = dWp[l]; dWp[l] = tmp;
                tmp = dSc[l]; dSc[l] = dSp[l]; dSp[l] = tmp;
            }
        }
        for (int64_t l = 0; l < L; l++) {
            memcpy(dW0[l] + t * sz[l], dWc[l], sizeof(S) * sz[l]);
            memcpy(dS0[l] + t * sz[l], dSc[l], sizeof(S) * sz[l]);
        }
        free(block);
    }
}

#undef VEC
#undef NV
#undef MAXL
