/* Body of chunk_memory.c for one scalar type: included once with S = float (SUF _f32) and once
   with S = double (_f64). See chunk_memory.c for the math and layouts. */

#define MAXL 16

typedef S SUF(vec) __attribute__((vector_size(64)));
/* the same vector at element alignment: loads and stores of it are unaligned moves */
typedef S SUF(uvec) __attribute__((vector_size(64), aligned(sizeof(S))));
#define VEC SUF(vec)
#define UVEC SUF(uvec)
#define NV ((int64_t)(64 / sizeof(S)))
#ifdef NT_STORE_f32
#define NT_STORE(p, v) SUF(NT_STORE)(p, v)
#else
#define NT_STORE(p, v) (*(VEC *)(p) = (v))
#endif

/* gemm and transpose: kernels/csrc/small_matrix_impl.h, included before this file. */

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

/* *s1 = <x, y1>, *s2 = <x, y2> over d elements, in vector accumulators (gcc leaves a scalar
   reduction loop scalar without -ffast-math, even under omp simd when the loop also stores). */
static inline void SUF(dot2)(int64_t d, const S *x, const S *y1, const S *y2, S *s1, S *s2) {
    VEC a1 = {0}, a2 = {0};
    int64_t j = 0;
    for (; j + NV <= d; j += NV) {
        const VEC xv = *(const UVEC *)(x + j);
        a1 += xv * *(const UVEC *)(y1 + j);
        a2 += xv * *(const UVEC *)(y2 + j);
    }
    S r1 = 0, r2 = 0;
    for (int64_t e = 0; e < NV; e++) { r1 += a1[e]; r2 += a2[e]; }
    for (; j < d; j++) { r1 += x[j] * y1[j]; r2 += x[j] * y2[j]; }
    *s1 = r1;
    *s2 = r2;
}

/* Per-task scratch: a bump allocator over one block. */
typedef struct { S *p; } SUF(arena);
static S *SUF(take)(SUF(arena) *a, int64_t n) { S *r = a->p; a->p += (n + 15) / 16 * 16; return r; }

/* Gates are clamped away from 0 before the log (chunk.py's _LOG_EPS). */
#define LOG_EPS ((S)1e-12)

/* The chunk's scalar coefficients from its gates (chunk.py: chunk_coefficients), in log space:
   u_t = log E_t, w_t = log beta_t; c_M0 = beta_n, c_S0_S = E_n, c_S0_M = sum_t beta_n/beta_t E_t,
   cS_i = theta_i E_n/E_i, cM_i = theta_i sum_{t>=i} (beta_n/beta_t)(E_t/E_i). th, et, al [n]. */
static void SUF(coefficients)(int64_t n, const S *th, const S *et, const S *al, S *u, S *w, S *cM, S *cS,
                              S *aM, S *bM, S *bS) {
    S su = 0, sw = 0;
    for (int64_t t = 0; t < n; t++) {
        su += log(et[t] > LOG_EPS ? et[t] : LOG_EPS);
        sw += log((S)1 - al[t] > LOG_EPS ? (S)1 - al[t] : LOG_EPS);
        u[t] = su;
        w[t] = sw;
    }
    const S ul = u[n - 1], wl = w[n - 1];
    S b = 0;
    for (int64_t t = 0; t < n; t++) b += EXP(wl - w[t] + u[t]);
    *aM = EXP(wl); *bS = EXP(ul); *bM = b;
    for (int64_t i = 0; i < n; i++) {
        S acc = 0;
        for (int64_t t = i; t < n; t++) acc += EXP(wl - w[t] + u[t] - u[i]);
        cM[i] = th[i] * acc;
        cS[i] = th[i] * EXP(ul - u[i]);
    }
}

/* Gradients of `coefficients`: from d c_M0, d c_S0_M, d c_S0_S and dc [n][2] (d cM_i, d cS_i) to
   d theta, d eta, d alpha [n]. du, dw [n] (gradients of u, w) and dth are added to: the caller
   zeros them, or leaves the per-token read's share in them (token_coefficients_bwd). */
static void SUF(coefficients_bwd)(int64_t n, const S *th, const S *et, const S *al, const S *u, const S *w,
                                  S daM, S dbM, S dbS, const S *dc, S *du, S *dw, S *dth, S *det, S *dal) {
    const S ul = u[n - 1], wl = w[n - 1];
    dw[n - 1] += daM * EXP(wl);
    du[n - 1] += dbS * EXP(ul);
    for (int64_t t = 0; t < n; t++) {
        const S r = dbM * EXP(wl - w[t] + u[t]);
        dw[n - 1] += r; dw[t] -= r; du[t] += r;
    }
    for (int64_t i = 0; i < n; i++) {
        const S G = EXP(ul - u[i]), gS = dc[2 * i + 1] * th[i] * G;
        du[n - 1] += gS; du[i] -= gS;
        S A = 0;
        for (int64_t t = i; t < n; t++) {
            const S K = EXP(wl - w[t] + u[t] - u[i]), kk = dc[2 * i] * th[i] * K;
            A += K;
            dw[n - 1] += kk; dw[t] -= kk; du[t] += kk; du[i] -= kk;
        }
        dth[i] += dc[2 * i] * A + dc[2 * i + 1] * G;
    }
    /* u, w are cumsums of log eta, log(1 - alpha): reverse cumsums, then through log and clamp */
    S cu = 0, cw = 0;
    for (int64_t j = n - 1; j >= 0; j--) {
        cu += du[j]; cw += dw[j];
        det[j] = et[j] >= LOG_EPS ? cu / et[j] : 0;
        dal[j] = (S)1 - al[j] >= LOG_EPS ? -cw / ((S)1 - al[j]) : 0;
    }
}

/* The chunk's forward from W, X[0] already holding the chunk's rows [q (n rows); k (n rows)]:
   X[l] [2n][w_l], Z[l] [2n][w_{l+1}], delta[l], P[l] [n][w_{l+1}] (key rows; P only for
   l < L-1); v [n][w_L]; WT[l] receives W_l^T for l >= 1 (entries may share one buffer). */
static void SUF(chunk_forward)(int64_t L, const int64_t *w, int64_t n, int act, const S *v, S *const *W, S **X,
                               S **Z, S **delta, S **P, S *const *WT, int keys_only) {
    /* keys_only: the key rows alone (the token read runs the query rows through its own path) */
    const int64_t r0 = keys_only ? n : 0;
    for (int64_t l = 0; l < L; l++) {
        SUF(gemm)(2 * n - r0, w[l + 1], w[l], 1, X[l] + r0 * w[l], w[l], 1, W[l], w[l + 1], 0, Z[l] + r0 * w[l + 1],
                  w[l + 1]);
        if (l < L - 1)
            SUF(activation)(act, Z[l] + r0 * w[l + 1], (2 * n - r0) * w[l + 1], X[l + 1] + r0 * w[l + 1], NULL, NULL);
    }
    const S *zk = Z[L - 1] + n * w[L];
    for (int64_t i = 0; i < n * w[L]; i++) delta[L - 1][i] = 2 * (zk[i] - v[i]);
    for (int64_t l = L - 2; l >= 0; l--) {
        /* P_l = delta_{l+1} W_{l+1}^T, delta_l = P_l act'(z_l) */
        SUF(transpose)(W[l + 1], w[l + 1], w[l + 2], WT[l + 1]);
        SUF(gemm)(n, w[l + 1], w[l + 2], 1, delta[l + 1], w[l + 2], 1, WT[l + 1], w[l + 1], 0, P[l], w[l + 1]);
        SUF(activation)(act, Z[l] + n * w[l + 1], n * w[l + 1], NULL, delta[l], NULL);
        for (int64_t i = 0; i < n * w[l + 1]; i++) delta[l][i] *= P[l][i];
    }
}

/* Per-token clip of the inner gradient (clip > 0): g_i = sum_l x_{i,l}^T delta_{i,l} has
   |g_i|^2 = sum_l |x_{i,l}|^2 |delta_{i,l}|^2 (outer products); sq[i] receives it and sc[i] the
   scale clip / max(|g_i|, clip). X[l] holds the query rows first, so the key rows start at n w_l.
   xn, dn [L][b] receive the per-layer squared norms |x_{i,l}|^2, |delta_{i,l}|^2 (the backward
   reuses them). The norms are vector reductions (omp simd): their summation order is not the
   sequential one, the same rounding-level freedom as any blocked dot product. */
static void SUF(clip_scale)(int64_t L, const int64_t *w, int64_t n, int64_t b, S clip, S *const *X,
                            S *const *delta, S *xn, S *dn, S *sq, S *sc) {
    for (int64_t i = 0; i < n; i++) sq[i] = 0;
    for (int64_t l = 0; l < L; l++) {
        const int64_t d = w[l + 1], wl = w[l];
        const S *xk = X[l] + n * wl, *dl = delta[l];
        for (int64_t i = 0; i < n; i++) {
            S x2 = 0, d2 = 0;
            _Pragma("omp simd reduction(+:x2)") for (int64_t j = 0; j < wl; j++) x2 += xk[i * wl + j] * xk[i * wl + j];
            _Pragma("omp simd reduction(+:d2)") for (int64_t j = 0; j < d; j++) d2 += dl[i * d + j] * dl[i * d + j];
            xn[l * b + i] = x2;
            dn[l * b + i] = d2;
            sq[i] += x2 * d2;
        }
    }
    for (int64_t i = 0; i < n; i++) sc[i] = sq[i] > clip * clip ? clip / sqrt(sq[i]) : (S)1;
}

/* The per-token read's coefficients (chunk.py: token_coefficients): M_t = a_t M_0 + bS_t S_0 -
   sum_{i<=t} Cm[t][i] g_i with a_t = beta_t = e^{w_t}, bS_t = sum_{j<=t} e^{w_t - w_j + u_j} and
   Cm[t][i] = th_i sc_i K[t][i], K[t][i] = sum_{j=i..t} e^{w_t - w_j + u_j - u_i} (0 above the
   diagonal); sc: the clip's scale. By the recurrences bS_t = rho_t bS_{t-1} + e^{u_t},
   K[t][i] = rho_t K[t-1][i] + e^{u_t - u_i} (rho_t = e^{w_t - w_{t-1}} = 1 - alpha_t), O(n^2). Row
   n-1 is the chunk end: a_{n-1} = c_M0, bS_{n-1} = c_S0_M, Cm[n-1] = c_M sc. rho [n] scratch. */
static void SUF(token_coefficients)(int64_t n, const S *th, const S *sc, const S *u, const S *w, S *Cm, S *K, S *a,
                                    S *bS, S *rho) {
    for (int64_t t = 0; t < n; t++) {
        a[t] = EXP(w[t]);
        rho[t] = t ? EXP(w[t] - w[t - 1]) : 0;
        bS[t] = (t ? rho[t] * bS[t - 1] : 0) + EXP(u[t]);
        for (int64_t i = 0; i < n; i++) {
            const S k = i < t ? rho[t] * K[(t - 1) * n + i] + EXP(u[t] - u[i]) : (i == t ? (S)1 : (S)0);
            K[t * n + i] = k;
            Cm[t * n + i] = th[i] * sc[i] * k;
        }
    }
}

/* Gradients of token_coefficients (run first: K, bS, rho as it left them) from dCm [n][n], da,
   dbS [n]: added to du, dw (of the log cumsums u, w), dth and dsc [n]; the recurrences reversed. */
static void SUF(token_coefficients_bwd)(int64_t n, const S *th, const S *sc, const S *u, const S *w, const S *K,
                                        const S *a, const S *bS, const S *rho, const S *dCm, const S *da,
                                        const S *dbS, S *du, S *dw, S *dth, S *dsc, S *drho) {
    for (int64_t t = 0; t < n; t++) {
        dw[t] += da[t] * a[t];
        drho[t] = 0;
    }
    S g = 0;
    for (int64_t t = n - 1; t >= 0; t--) {
        g = dbS[t] + (t < n - 1 ? rho[t + 1] * g : 0);
        du[t] += g * EXP(u[t]);
        if (t) drho[t] += g * bS[t - 1];
    }
    for (int64_t i = 0; i < n; i++) {
        S st = 0;
        for (int64_t t = n - 1; t >= i; t--) {
            const S d = dCm[t * n + i];
            st += d * K[t * n + i];
            g = d * th[i] * sc[i] + (t < n - 1 ? rho[t + 1] * g : 0);
            if (t > i) {
                const S e = g * EXP(u[t] - u[i]);
                du[t] += e; du[i] -= e;
                drho[t] += g * K[(t - 1) * n + i];
            }
        }
        dth[i] += sc[i] * st;
        dsc[i] += th[i] * st;
    }
    for (int64_t t = 1; t < n; t++) {
        const S r = drho[t] * rho[t];
        dw[t] += r; dw[t - 1] -= r;
    }
}

/* Scratch of the per-token read (one chunk of n <= b rows): the query path's layer inputs Hq[l]
   [n][w_l] (Hq[0] the query rows of X[0]), pre-activations Zq[l], the products Z1 = H W_l and
   Z2 = H S_l [n][w_{l+1}], G[l] = H xk_l^T [n][n]; Cm [n][n], a, bS [n]; tmp [n][n], T1 [wmax][b]. */
typedef struct {
    S *Hq[MAXL], *Zq[MAXL], *Z1[MAXL], *Z2[MAXL], *G[MAXL];
    S *Cm, *K, *a, *bS, *rho, *drho, *tmp, *T1;
} SUF(tread);

static void SUF(tread_init)(SUF(tread) *r, SUF(arena) *ar, int64_t L, const int64_t *w, int64_t b, int64_t wmax) {
    for (int64_t l = 0; l < L; l++) {
        r->Hq[l] = l ? SUF(take)(ar, b * w[l]) : NULL;
        r->Zq[l] = SUF(take)(ar, b * w[l + 1]);
        r->Z1[l] = SUF(take)(ar, b * w[l + 1]);
        r->Z2[l] = SUF(take)(ar, b * w[l + 1]);
        r->G[l] = SUF(take)(ar, b * b);
    }
    r->Cm = SUF(take)(ar, b * b);
    r->K = SUF(take)(ar, b * b);
    r->rho = SUF(take)(ar, b);
    r->drho = SUF(take)(ar, b);
    r->tmp = SUF(take)(ar, b * b);
    r->a = SUF(take)(ar, b);
    r->bS = SUF(take)(ar, b);
    r->T1 = SUF(take)(ar, b * wmax);
}
#define TREAD_SCRATCH(L, b, wmax) \
    ((L) * (4 * (b) * (wmax) + (b) * (b) + 80) + 3 * (b) * (b) + (b) * (wmax) + 4 * (b) + 256)

/* y_t = M_t(q_t), the dual form (chunk.py: token_read): per layer
   Zq_l = a * (H W_l) + bS * (H S_l) - (Cm * (H xk_l^T)) delta_l,  H_{l+1} = act(Zq_l), H_0 = q,
   from the chunk-start W, S, the key rows xk_l of X[l] and errors delta_l (chunk_forward) and
   Cm, a, bS (token_coefficients, already in r). Output: r->Zq[L-1] [n][w_L]. */
static void SUF(token_read_fwd)(SUF(tread) *r, int64_t L, const int64_t *w, int64_t n, int act, S *const *W,
                                S *const *Sm, S *const *X, S *const *delta) {
    r->Hq[0] = X[0];
    for (int64_t l = 0; l < L; l++) {
        const int64_t d = w[l + 1];
        const S *H = r->Hq[l], *xk = X[l] + n * w[l];
        SUF(gemm)(n, d, w[l], 1, H, w[l], 1, W[l], d, 0, r->Z1[l], d);
        SUF(gemm)(n, d, w[l], 1, H, w[l], 1, Sm[l], d, 0, r->Z2[l], d);
        SUF(transpose)(xk, n, w[l], r->T1);
        SUF(gemm)(n, n, w[l], 1, H, w[l], 1, r->T1, n, 0, r->G[l], n);
        for (int64_t e = 0; e < n * n; e++) r->tmp[e] = r->Cm[e] * r->G[l][e];
        S *z = r->Zq[l];
        for (int64_t t = 0; t < n; t++)
            for (int64_t j = 0; j < d; j++)
                z[t * d + j] = r->a[t] * r->Z1[l][t * d + j] + r->bS[t] * r->Z2[l][t * d + j];
        SUF(gemm)(n, d, n, -1, r->tmp, n, 1, delta[l], d, 1, z, d);
        if (l < L - 1) SUF(activation)(act, z, n * d, r->Hq[l + 1], NULL, NULL);
    }
}

/* Backward of token_read_fwd (run first, so r holds the chunk's forward) from dz = d o [n][w_L]
   (overwritten): adds to dW[l], dS[l] (the chunk-start state), ddelta[l] [n][w_{l+1}], dxk[l]
   [n][w_l] (the key rows' inputs), dCm [n][n], da, dbS [n]; writes dq [n][w_0]. WT[l] = W_l^T,
   ST scratch [wmax][wmax], buf [n][wmax] x 3. */
static void SUF(token_read_bwd)(SUF(tread) *r, int64_t L, const int64_t *w, int64_t n, int act, S *const *Sm,
                                S *const *WT, S *const *X, S *const *delta, S *dz, S *const *dW, S *const *dSt,
                                S *const *ddelta, S *const *dxk, S *dCm, S *da, S *dbS, S *dq, S *ST, S *az, S *bz,
                                S *dG) {
    for (int64_t l = L - 1; l >= 0; l--) {
        const int64_t d = w[l + 1];
        const S *H = r->Hq[l], *xk = X[l] + n * w[l];
        for (int64_t t = 0; t < n; t++) {
            S sa, sb;
            const S *g = dz + t * d, at = r->a[t], bt = r->bS[t];
            SUF(dot2)(d, g, r->Z1[l] + t * d, r->Z2[l] + t * d, &sa, &sb);
            S *azt = az + t * d, *bzt = bz + t * d;
            for (int64_t j = 0; j < d; j++) {
                azt[j] = at * g[j];
                bzt[j] = bt * g[j];
            }
            da[t] += sa;
            dbS[t] += sb;
        }
        /* dW_l += H^T (a dz), dS_l += H^T (bS dz) */
        SUF(gemm)(w[l], d, n, 1, H, 1, w[l], az, d, 1, dW[l], d);
        SUF(gemm)(w[l], d, n, 1, H, 1, w[l], bz, d, 1, dSt[l], d);
        /* ddelta_l -= (Cm * G)^T dz */
        for (int64_t e = 0; e < n * n; e++) r->tmp[e] = r->Cm[e] * r->G[l][e];
        SUF(gemm)(n, d, n, -1, r->tmp, 1, n, dz, d, 1, ddelta[l], d);
        /* d(Cm * G) = -dz delta_l^T: dCm += it * G, dG = it * Cm */
        SUF(transpose)(delta[l], n, d, r->T1);
        SUF(gemm)(n, n, d, -1, dz, d, 1, r->T1, n, 0, dG, n);
        for (int64_t e = 0; e < n * n; e++) {
            dCm[e] += dG[e] * r->G[l][e];
            dG[e] *= r->Cm[e];
        }
        /* dxk_l += dG^T H; dH = (a dz) W^T + (bS dz) S^T + dG xk */
        SUF(gemm)(n, w[l], n, 1, dG, 1, n, H, w[l], 1, dxk[l], w[l]);
        S *dH = l ? dz : dq;  /* dz [n][d] is spent: for l > 0 its buffer (n x wmax) takes dH */
        S *tmpH = r->T1;
        SUF(gemm)(n, w[l], d, 1, az, d, 1, WT[l], w[l], 0, tmpH, w[l]);
        SUF(transpose)(Sm[l], w[l], d, ST);
        SUF(gemm)(n, w[l], d, 1, bz, d, 1, ST, w[l], 1, tmpH, w[l]);
        SUF(gemm)(n, w[l], n, 1, dG, n, 1, xk, w[l], 1, tmpH, w[l]);
        if (l) {
            /* dz_{l-1} = dH act'(Zq_{l-1}) */
            SUF(activation)(act, r->Zq[l - 1], n * w[l], NULL, az, NULL);
            for (int64_t e = 0; e < n * w[l]; e++) dH[e] = tmpH[e] * az[e];
        } else {
            memcpy(dH, tmpH, sizeof(S) * n * w[0]);
        }
    }
}

/* the memory MLP on m rows already in X[0]: X[l+1] = act(Z[l]), Z[l] = X[l] W_l */
static void SUF(mlp_rows)(int64_t L, const int64_t *w, int64_t m, int act, S *const *W, S **X, S **Z) {
    for (int64_t l = 0; l < L; l++) {
        SUF(gemm)(m, w[l + 1], w[l], 1, X[l], w[l], 1, W[l], w[l + 1], 0, Z[l], w[l + 1]);
        if (l < L - 1) SUF(activation)(act, Z[l], m * w[l + 1], X[l + 1], NULL, NULL);
    }
}

/* rows [n][d] of a strided [B][T][H][d] tensor (element strides sT between rows) <-> contiguous */
static void SUF(gather)(const S *src, int64_t sT, int64_t n, int64_t d, S *dst) {
    for (int64_t i = 0; i < n; i++) memcpy(dst + i * d, src + i * sT, sizeof(S) * d);
}
static void SUF(scatter)(const S *src, int64_t n, int64_t d, S *dst, int64_t sT) {
    for (int64_t i = 0; i < n; i++) memcpy(dst + i * sT, src + i * d, sizeof(S) * d);
}

/* Strides (in elements) of q, k, v [B][T][H][D], theta, eta, alpha [B][T][H] and the read's
   queries qr [B][Tr][H][D_0]: st[3 x] = (batch, time, head) of tensor x in the order q, k, v, theta,
   eta, alpha, qr. The last dim is contiguous. */
#define OFF(x, bi, ti, h) ((bi) * st[3 * (x)] + (ti) * st[3 * (x) + 1] + (h) * st[3 * (x) + 2])

/* The chunk's rows [t0, t0 + n) of task (bi, h): q and k stacked into X0 [2n][w_0], v into vb
   [n][w_L], the gates into gth, get, gal [n]. */
static void SUF(load_chunk)(const S *q, const S *k, const S *v, const S *th, const S *et, const S *al,
                            const int64_t *st, const int64_t *w, int64_t L, int64_t bi, int64_t h, int64_t t0,
                            int64_t n, S *X0, S *vb, S *gth, S *get, S *gal) {
    SUF(gather)(q + OFF(0, bi, t0, h), st[1], n, w[0], X0);
    SUF(gather)(k + OFF(1, bi, t0, h), st[4], n, w[0], X0 + n * w[0]);
    SUF(gather)(v + OFF(2, bi, t0, h), st[7], n, w[L], vb);
    for (int64_t i = 0; i < n; i++) {
        gth[i] = th[OFF(3, bi, t0 + i, h)];
        get[i] = et[OFF(4, bi, t0 + i, h)];
        gal[i] = al[OFF(5, bi, t0 + i, h)];
    }
}

void SUF(titans_chunk_fwd)(const S *q, const S *k, const S *v, const S *th, const S *et, const S *al,
                           const int64_t *st, const int64_t *w, int64_t L, S *const *W0, int w0_batched,
                           S *const *S0, S *const *Wout, S *const *Sout, S *const *Wst, S *const *Sst, S *o,
                           const S *qr, int64_t Tr, S *or_, int64_t B, int64_t H, int64_t T, int64_t b, int act,
                           double clip, int read, int nthreads) {
    int64_t wmax = 0, sz[MAXL];
    for (int64_t l = 0; l <= L; l++) wmax = w[l] > wmax ? w[l] : wmax;
    for (int64_t l = 0; l < L; l++) sz[l] = w[l] * w[l + 1];
    const int64_t N = (T + b - 1) / b;
    const int64_t scratch = 8 * (L + 2) * (2 * b * wmax + 16) + wmax * wmax + 16 * b + 256 + TREAD_SCRATCH(L, b, wmax)
                            + 2 * (L * b + 16);
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")
    for (int64_t task = 0; task < B * H; task++) {
        const int64_t bi = task / H, h = task % H;
        S *block = (S *)malloc(sizeof(S) * scratch);
        SUF(arena) a = {block};
        S *X[MAXL], *Z[MAXL], *delta[MAXL], *P[MAXL], *Wc[MAXL], *Sc[MAXL];
        for (int64_t l = 0; l < L; l++) {
            X[l] = SUF(take)(&a, 2 * b * w[l]);
            Z[l] = SUF(take)(&a, 2 * b * w[l + 1]);
            delta[l] = SUF(take)(&a, b * w[l + 1]);
            P[l] = SUF(take)(&a, b * w[l + 1]);
        }
        S *WT = SUF(take)(&a, wmax * wmax), *cd = SUF(take)(&a, 2 * b * wmax), *vb = SUF(take)(&a, b * w[L]);
        S *WTs[MAXL];
        for (int64_t l = 0; l < L; l++) WTs[l] = WT;
        S *gth = SUF(take)(&a, b), *get = SUF(take)(&a, b), *gal = SUF(take)(&a, b);
        S *u = SUF(take)(&a, b), *uw = SUF(take)(&a, b), *cM = SUF(take)(&a, b), *cS = SUF(take)(&a, b);
        S *csq = SUF(take)(&a, b), *csc = SUF(take)(&a, b);
        S *cxn = SUF(take)(&a, L * b), *cdn = SUF(take)(&a, L * b);
        SUF(tread) r;
        SUF(tread_init)(&r, &a, L, w, b, wmax);
        for (int64_t i = 0; i < b; i++) csc[i] = 1;
        for (int64_t l = 0; l < L; l++) {
            Wc[l] = Wout[l] + task * sz[l];
            Sc[l] = Sout[l] + task * sz[l];
            memcpy(Wc[l], W0[l] + (w0_batched ? task : h) * sz[l], sizeof(S) * sz[l]);
            if (S0) memcpy(Sc[l], S0[l] + task * sz[l], sizeof(S) * sz[l]);
            else memset(Sc[l], 0, sizeof(S) * sz[l]);
        }
        for (int64_t c = 0; c < N; c++) {
            const int64_t t0 = c * b, n = T - t0 < b ? T - t0 : b, tn = task * N + c;
            S am, bm, bs;
            SUF(load_chunk)(q, k, v, th, et, al, st, w, L, bi, h, t0, n, X[0], vb, gth, get, gal);
            SUF(coefficients)(n, gth, get, gal, u, uw, cM, cS, &am, &bm, &bs);
            SUF(chunk_forward)(L, w, n, act, vb, Wc, X, Z, delta, P, WTs, read);
            if (clip > 0) {
                SUF(clip_scale)(L, w, n, b, (S)clip, X, delta, cxn, cdn, csq, csc);
                for (int64_t i = 0; i < n; i++) { cM[i] *= csc[i]; cS[i] *= csc[i]; }
            }
            if (read) {  /* y_t = M_t(q_t) from the chunk-start state, before the update below */
                SUF(token_coefficients)(n, gth, csc, u, uw, r.Cm, r.K, r.a, r.bS, r.rho);
                SUF(token_read_fwd)(&r, L, w, n, act, Wc, Sc, X, delta);
            }
            SUF(scatter)(read ? r.Zq[L - 1] : Z[L - 1], n, w[L], o + ((bi * T + t0) * H + h) * w[L], H * w[L]);
            for (int64_t l = 0; l < L; l++) {
                const int64_t d = w[l + 1];
                /* save the chunk-start state for the backward while scaling it, in one pass */
                S *ws = Wst[l] + tn * sz[l], *ss = Sst[l] + tn * sz[l], *wc = Wc[l], *sc = Sc[l];
                int64_t e = 0;
                if (((uintptr_t)ws | (uintptr_t)ss | (uintptr_t)wc | (uintptr_t)sc) % 64 == 0) {
                    /* the saved copies bypass the cache (non-temporal stores): 4 MB a call that only
                       the backward reads, much later; writing them through the cache cost more
                       than the chunk's arithmetic */
                    for (; e + NV <= sz[l]; e += NV) {
                        const VEC we = *(const VEC *)(wc + e), se = *(const VEC *)(sc + e);
                        NT_STORE(ws + e, we);
                        NT_STORE(ss + e, se);
                        *(VEC *)(wc + e) = am * we + bm * se;
                        *(VEC *)(sc + e) = bs * se;
                    }
                }
                for (; e < sz[l]; e++) {
                    const S we = wc[e], se = sc[e];
                    ws[e] = we;
                    ss[e] = se;
                    wc[e] = am * we + bm * se;
                    sc[e] = bs * se;
                }
                S *cdM = cd, *cdS = cd + n * d;
                for (int64_t i = 0; i < n; i++)
                    for (int64_t j = 0; j < d; j++) {
                        cdM[i * d + j] = cM[i] * delta[l][i * d + j];
                        cdS[i * d + j] = cS[i] * delta[l][i * d + j];
                    }
                /* W -= x^T (c_M delta), S -= x^T (c_S delta); x^T read through strides */
                const S *xk = X[l] + n * w[l];
                SUF(gemm)(w[l], d, n, -1, xk, 1, w[l], cdM, d, 1, Wc[l], d);
                SUF(gemm)(w[l], d, n, -1, xk, 1, w[l], cdS, d, 1, Sc[l], d);
            }
        }
        /* the read after the chain: or = M_final(qr), in blocks of up to 2b rows */
        for (int64_t t0 = 0; qr && t0 < Tr; t0 += 2 * b) {
            const int64_t m = Tr - t0 < 2 * b ? Tr - t0 : 2 * b;
            SUF(gather)(qr + OFF(6, bi, t0, h), st[19], m, w[0], X[0]);
            SUF(mlp_rows)(L, w, m, act, Wc, X, Z);
            SUF(scatter)(Z[L - 1], m, w[L], or_ + ((bi * Tr + t0) * H + h) * w[L], H * w[L]);
        }
        free(block);
    }
    STORE_FENCE();
}

/* Gradients of titans_chunk_fwd. do_ [B][T][H][D_L] contiguous; dWf, dSf: gradients of the final
   state [B*H][...] (NULL or NULL entries: zero). Writes dq, dk [B][T][H][D_0], dv [B][T][H][D_L],
   dth, det, dal [B][T][H] (all contiguous) and dW0[l], dS0[l] [B*H][w_l][w_{l+1}] (the caller sums
   dW0 over the batch when the initial weights are shared). */
void SUF(titans_chunk_bwd)(const S *q, const S *k, const S *v, const S *th, const S *et, const S *al,
                           const int64_t *st, const int64_t *w, int64_t L, S *const *Wst, S *const *Sst,
                           const S *do_, S *const *dWf, S *const *dSf, S *dq, S *dk, S *dv, S *dth, S *det,
                           S *dal, S *const *dW0, S *const *dS0, const S *qr, int64_t Tr, S *const *Wfin,
                           const S *dor, S *dqr, int64_t B, int64_t H, int64_t T, int64_t b, int act,
                           double clip, int read, int nthreads) {
    int64_t wmax = 0, sz[MAXL], szsum = 0;
    for (int64_t l = 0; l <= L; l++) wmax = w[l] > wmax ? w[l] : wmax;
    for (int64_t l = 0; l < L; l++) { sz[l] = w[l] * w[l + 1]; szsum += sz[l] + 16; }
    const int64_t N = (T + b - 1) / b;
    const int64_t scratch = 16 * (L + 2) * (2 * b * wmax + 16) + 4 * szsum + (L + 2) * (wmax * wmax + 16)
                            + 24 * (b + 16) + 64 + TREAD_SCRATCH(L, b, wmax) + 4 * b * (wmax + 16) + 3 * b * (b + 16)
                            + wmax * wmax + 8 * (b + 16) + 256 + 2 * (L * b + 16);
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")
    for (int64_t task = 0; task < B * H; task++) {
        const int64_t bi = task / H, h = task % H;
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
        S *dAT = SUF(take)(&a, b * wmax);
        S *g1 = SUF(take)(&a, 2 * b * wmax), *g2 = SUF(take)(&a, 2 * b * wmax);
        S *cd = SUF(take)(&a, 2 * b * wmax), *d1 = SUF(take)(&a, b * wmax), *dcn = SUF(take)(&a, 2 * b);
        S *vb = SUF(take)(&a, b * w[L]), *gth = SUF(take)(&a, b), *get = SUF(take)(&a, b), *gal = SUF(take)(&a, b);
        S *u = SUF(take)(&a, b), *uw = SUF(take)(&a, b), *cM = SUF(take)(&a, b), *cS = SUF(take)(&a, b);
        S *du = SUF(take)(&a, b), *dw = SUF(take)(&a, b), *gdth = SUF(take)(&a, b), *gdet = SUF(take)(&a, b);
        S *gdal = SUF(take)(&a, b);
        S *csq = SUF(take)(&a, b), *csc = SUF(take)(&a, b), *cM0 = SUF(take)(&a, b), *cS0 = SUF(take)(&a, b);
        S *cxn = SUF(take)(&a, L * b), *cdn = SUF(take)(&a, L * b);
        SUF(tread) r;
        SUF(tread_init)(&r, &a, L, w, b, wmax);
        S *rdz = SUF(take)(&a, b * wmax), *raz = SUF(take)(&a, b * wmax), *rbz = SUF(take)(&a, b * wmax);
        S *rdq = SUF(take)(&a, b * wmax), *rdG = SUF(take)(&a, b * b), *rdCm = SUF(take)(&a, b * b);
        S *rda = SUF(take)(&a, b), *rdb = SUF(take)(&a, b), *rdsc = SUF(take)(&a, b);
        S *rST = SUF(take)(&a, wmax * wmax);
        for (int64_t i = 0; i < b; i++) csc[i] = 1;
        for (int64_t l = 0; l < L; l++) {
            if (dWf && dWf[l]) memcpy(dWc[l], dWf[l] + task * sz[l], sizeof(S) * sz[l]);
            else memset(dWc[l], 0, sizeof(S) * sz[l]);
            if (dSf && dSf[l]) memcpy(dSc[l], dSf[l] + task * sz[l], sizeof(S) * sz[l]);
            else memset(dSc[l], 0, sizeof(S) * sz[l]);
        }
        /* the read after the chain, or = M_final(qr): its weight gradient joins dW_final */
        if (qr) {
            S *Wf[MAXL];
            for (int64_t l = 0; l < L; l++) {
                Wf[l] = Wfin[l] + task * sz[l];
                SUF(transpose)(Wf[l], w[l], w[l + 1], WT[l]);
            }
            for (int64_t t0 = 0; t0 < Tr; t0 += 2 * b) {
                const int64_t m = Tr - t0 < 2 * b ? Tr - t0 : 2 * b, orow = (bi * Tr + t0) * H + h;
                S *G = g1, *D = g2;
                SUF(gather)(qr + OFF(6, bi, t0, h), st[19], m, w[0], X[0]);
                SUF(mlp_rows)(L, w, m, act, Wf, X, Z);
                SUF(gather)(dor + orow * w[L], H * w[L], m, w[L], G);
                for (int64_t l = L - 1; l >= 0; l--) {
                    SUF(gemm)(w[l], w[l + 1], m, 1, X[l], 1, w[l], G, w[l + 1], 1, dWc[l], w[l + 1]);
                    SUF(gemm)(m, w[l], w[l + 1], 1, G, w[l + 1], 1, WT[l], w[l], 0, D, w[l]);
                    if (l) {
                        SUF(activation)(act, Z[l - 1], m * w[l], NULL, cd, NULL);
                        for (int64_t i = 0; i < m * w[l]; i++) G[i] = D[i] * cd[i];
                    }
                }
                SUF(scatter)(D, m, w[0], dqr + orow * w[0], H * w[0]);
            }
        }
        for (int64_t c = N - 1; c >= 0; c--) {
            const int64_t t0 = c * b, n = T - t0 < b ? T - t0 : b, tn = task * N + c;
            const int64_t orow = (bi * T + t0) * H + h;  /* row of token t0 in the contiguous outputs */
            S *W[MAXL], *Sm[MAXL];
            for (int64_t l = 0; l < L; l++) { W[l] = Wst[l] + tn * sz[l]; Sm[l] = Sst[l] + tn * sz[l]; }
            S am, bm, bs;
            SUF(load_chunk)(q, k, v, th, et, al, st, w, L, bi, h, t0, n, X[0], vb, gth, get, gal);
            SUF(coefficients)(n, gth, get, gal, u, uw, cM, cS, &am, &bm, &bs);
            SUF(chunk_forward)(L, w, n, act, vb, W, X, Z, delta, P, WT, read);  /* W_l^T for l >= 1 */
            SUF(transpose)(W[0], w[0], w[1], WT[0]);
            for (int64_t i = 0; i < n; i++) du[i] = dw[i] = gdth[i] = rdsc[i] = 0;
            if (clip > 0) {  /* the update used c' = c s (clip_scale); keep c for the scale's gradient */
                SUF(clip_scale)(L, w, n, b, (S)clip, X, delta, cxn, cdn, csq, csc);
                for (int64_t i = 0; i < n; i++) {
                    cM0[i] = cM[i]; cS0[i] = cS[i];
                    cM[i] *= csc[i]; cS[i] *= csc[i];
                }
            }
            /* scalar coefficients: d a = <dW', W>, d b_M = <dW', S>, d b_S = <dS', S>, and the
               linear part of the update: dW = a dW' + ..., dS = b_S dS' + b_M dW' */
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
            /* through the update: G_M = x^T (c_M delta), G_S = x^T (c_S delta), dG = -dW', -dS' */
            for (int64_t i = 0; i < 2 * n; i++) dcn[i] = 0;
            for (int64_t l = 0; l < L; l++) {
                const int64_t d = w[l + 1];
                const S *xk = X[l] + n * w[l];
                S *AM = g1, *AS = g2;
                SUF(gemm)(n, d, w[l], -1, xk, w[l], 1, dWc[l], d, 0, AM, d);
                SUF(gemm)(n, d, w[l], -1, xk, w[l], 1, dSc[l], d, 0, AS, d);
                for (int64_t i = 0; i < n; i++) {
                    S sM, sS;
                    const S cm = cM[i], cs = cS[i], *am_ = AM + i * d, *as_ = AS + i * d;
                    SUF(dot2)(d, delta[l] + i * d, am_, as_, &sM, &sS);
                    S *dd = ddelta[l] + i * d;
                    for (int64_t j = 0; j < d; j++) dd[j] = cm * am_[j] + cs * as_[j];
                    dcn[2 * i] += sM;
                    dcn[2 * i + 1] += sS;
                }
                /* dA = -(c_M delta) dW'^T - (c_S delta) dS'^T, formed transposed (dA^T = -dW' (c_M
                   delta)^T - ...: the [n x d] factors are transposed, not the [w_l x d] states) */
                S *cdMT = cd, *cdST = cd + n * d;
                /* delta^T through the register transpose, then each row scaled by c (contiguous) */
                SUF(transpose)(delta[l], n, d, cdST);
                for (int64_t j = 0; j < d; j++) {
                    S *rm = cdMT + j * n, *rs = cdST + j * n;
                    _Pragma("omp simd") for (int64_t i = 0; i < n; i++) {
                        const S x = rs[i];
                        rm[i] = cM[i] * x;
                        rs[i] = cS[i] * x;
                    }
                }
                SUF(gemm)(w[l], n, d, -1, dWc[l], d, 1, cdMT, n, 0, dAT, n);
                SUF(gemm)(w[l], n, d, -1, dSc[l], d, 1, cdST, n, 1, dAT, n);
                SUF(transpose)(dAT, w[l], n, dA[l]);
            }
            if (read) {
                /* the per-token read: recompute it, then its gradients join the chain's (the state
                   at the chunk start, ddelta, dA = d of the key rows' inputs) and the gates' */
                SUF(token_coefficients)(n, gth, csc, u, uw, r.Cm, r.K, r.a, r.bS, r.rho);
                SUF(token_read_fwd)(&r, L, w, n, act, W, Sm, X, delta);
                SUF(gather)(do_ + orow * w[L], H * w[L], n, w[L], rdz);
                for (int64_t i = 0; i < n; i++) rda[i] = rdb[i] = 0;
                for (int64_t e = 0; e < n * n; e++) rdCm[e] = 0;
                SUF(token_read_bwd)(&r, L, w, n, act, Sm, WT, X, delta, rdz, dWp, dSp, ddelta, dA, rdCm, rda, rdb, rdq,
                                    rST, raz, rbz, rdG);
                SUF(token_coefficients_bwd)(n, gth, csc, u, uw, r.K, r.a, r.bS, r.rho, rdCm, rda, rdb, du, dw, gdth,
                                            rdsc, r.drho);
            }
            if (clip > 0) {
                /* c' = c s, s = clip / |g| where |g|^2 = sq > clip^2: dc = dc' s, ds = <dc', c>,
                   d sq = -s ds / (2 sq), and sq = sum_l |x_l|^2 |delta_l|^2 adds to ddelta and dA */
                for (int64_t i = 0; i < n; i++) {
                    const S ds = dcn[2 * i] * cM0[i] + dcn[2 * i + 1] * cS0[i] + rdsc[i];
                    dcn[2 * i] *= csc[i];
                    dcn[2 * i + 1] *= csc[i];
                    csq[i] = csq[i] > (S)(clip * clip) ? -csc[i] * ds / csq[i] : 0;  /* 2 d sq */
                }
                for (int64_t l = 0; l < L; l++) {
                    const int64_t d = w[l + 1];
                    const S *xk = X[l] + n * w[l];
                    for (int64_t i = 0; i < n; i++) {
                        if (csq[i] == 0) continue;
                        /* the norms clip_scale left (xn, dn of this layer and row) */
                        const S fx = csq[i] * cxn[l * b + i], fd = csq[i] * cdn[l * b + i];
                        S *ddl = ddelta[l] + i * d, *dal_ = dA[l] + i * w[l];
                        const S *dl = delta[l] + i * d, *xr = xk + i * w[l];
                        _Pragma("omp simd") for (int64_t j = 0; j < d; j++) ddl[j] += fx * dl[j];
                        _Pragma("omp simd") for (int64_t j = 0; j < w[l]; j++) dal_[j] += fd * xr[j];
                    }
                }
                for (int64_t i = 0; i < n; i++) { cM[i] = cM0[i]; cS[i] = cS0[i]; }
            }
            /* the gates, through the coefficients */
            SUF(coefficients_bwd)(n, gth, get, gal, u, uw, sa, sbm, sbs, dcn, du, dw, gdth, gdet, gdal);
            for (int64_t i = 0; i < n; i++) {
                dth[orow + i * H] = gdth[i];
                det[orow + i * H] = gdet[i];
                dal[orow + i * H] = gdal[i];
            }
            /* inner backprop delta_l = P_l act'(z_l), P_l = delta_{l+1} W_{l+1}^T, differentiated */
            for (int64_t l = 0; l < L - 1; l++) {
                const int64_t d = w[l + 1];
                const S *zk = Z[l] + n * d;
                S *d2 = cd;
                SUF(activation)(act, zk, n * d, NULL, d1, d2);
                S *dP = g1;
                for (int64_t i = 0; i < n * d; i++) {
                    dP[i] = ddelta[l][i] * d1[i];
                    dz[l][i] = ddelta[l][i] * P[l][i] * d2[i];
                }
                SUF(gemm)(n, w[l + 2], d, 1, dP, d, 1, W[l + 1], w[l + 2], 1, ddelta[l + 1], w[l + 2]);
                SUF(gemm)(d, w[l + 2], n, 1, dP, 1, d, delta[l + 1], w[l + 2], 1, dWp[l + 1], w[l + 2]);
            }
            /* delta_{L-1} = 2 (z_{L-1} - v) */
            for (int64_t i = 0; i < n * w[L]; i++) {
                dz[L - 1][i] = 2 * ddelta[L - 1][i];
                vb[i] = -2 * ddelta[L - 1][i];
            }
            SUF(scatter)(vb, n, w[L], dv + orow * w[L], H * w[L]);
            /* the read (query rows) and key forward (key rows) backward, stacked as X is: G holds
               [dZq; dZ] [2n][w_{l+1}], so each layer is one weight-gradient product over 2n rows
               (dW_l += X_l^T G) and one input-gradient product (G W_l^T, plus dA on the key rows) */
            {
                /* with the token read, o is not a chunk-start read: the key rows only (from row r0) */
                const int64_t r0 = read ? n : 0, m = 2 * n - r0;
                S *G = g1, *D = g2, *d1s = cd;
                if (!read) SUF(gather)(do_ + orow * w[L], H * w[L], n, w[L], G);
                memcpy(G + n * w[L], dz[L - 1], sizeof(S) * n * w[L]);
                for (int64_t l = L - 1; l >= 0; l--) {
                    SUF(gemm)(w[l], w[l + 1], m, 1, X[l] + r0 * w[l], 1, w[l], G + r0 * w[l + 1], w[l + 1], 1, dWp[l],
                              w[l + 1]);
                    SUF(gemm)(m, w[l], w[l + 1], 1, G + r0 * w[l + 1], w[l + 1], 1, WT[l], w[l], 0, D + r0 * w[l],
                              w[l]);
                    S *Dk = D + n * w[l];
                    for (int64_t i = 0; i < n * w[l]; i++) Dk[i] += dA[l][i];
                    if (l) {
                        SUF(activation)(act, Z[l - 1] + r0 * w[l], m * w[l], NULL, d1s + r0 * w[l], NULL);
                        if (!read)
                            for (int64_t i = 0; i < n * w[l]; i++) G[i] = D[i] * d1s[i];
                        for (int64_t i = n * w[l]; i < 2 * n * w[l]; i++)
                            G[i] = dz[l - 1][i - n * w[l]] + D[i] * d1s[i];
                    }
                }
                SUF(scatter)(read ? rdq : D, n, w[0], dq + orow * w[0], H * w[0]);
                SUF(scatter)(D + n * w[0], n, w[0], dk + orow * w[0], H * w[0]);
            }
            for (int64_t l = 0; l < L; l++) {
                S *tmp = dWc[l]; dWc[l] = dWp[l]; dWp[l] = tmp;
                tmp = dSc[l]; dSc[l] = dSp[l]; dSp[l] = tmp;
            }
        }
        for (int64_t l = 0; l < L; l++) {
            memcpy(dW0[l] + task * sz[l], dWc[l], sizeof(S) * sz[l]);
            memcpy(dS0[l] + task * sz[l], dSc[l], sizeof(S) * sz[l]);
        }
        free(block);
    }
}

#undef OFF
#undef LOG_EPS
#undef VEC
#undef UVEC
#undef NV
#undef NT_STORE
#undef MAXL
