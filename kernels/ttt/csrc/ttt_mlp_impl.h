/* TTT-MLP for one scalar type: included after ttt_linear_impl.h (whose helpers it uses) with the
   same S / SUF. See ttt.c for the math and layouts. */

#define GELU_C ((S)0.7978845608028654) /* sqrt(2 / pi) */
#define GELU_A ((S)0.044715)

/* gelu_tanh(z) (f), its first (d1) and second (d2) derivatives over n values; any output may be
   NULL. One loop per case, so each vectorises (TANH is exp2-based in float32, ttt.c). */
static void SUF(gelu)(const S *z, int64_t n, S *f, S *d1, S *d2) {
#define GELU_T const S x = z[i], u1 = GELU_C * ((S)1 + (S)3 * GELU_A * x * x); \
                   const S t = TANH(GELU_C * (x + GELU_A * x * x * x)), s = (S)1 - t * t; (void)s; (void)u1
#define GELU_F (S)0.5 * x * ((S)1 + t)
#define GELU_D1 (S)0.5 * ((S)1 + t) + (S)0.5 * x * s * u1
#define GELU_D2 s * u1 + (S)0.5 * x * s * ((S)6 * GELU_C * GELU_A * x - (S)2 * t * u1 * u1)
    if (f && d1) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) { GELU_T; f[i] = GELU_F; d1[i] = GELU_D1; }
    } else if (f) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) { GELU_T; f[i] = GELU_F; }
    } else if (d1) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) { GELU_T; d1[i] = GELU_D1; }
    }
    if (d2) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) { GELU_T; d2[i] = GELU_D2; }
    }
#undef GELU_T
#undef GELU_F
#undef GELU_D1
#undef GELU_D2
}

typedef struct {
    S *Z1, *X2, *gp1, *P1, *G1, *Z1b, *X2b, *X2e, *S2, *A2, *W2T;
} SUF(mlpb);

static int64_t SUF(mlp_scratch_size)(int64_t D, int64_t F, int64_t bs) {
    const int64_t kf = (bs * F + 15) / 16 * 16, df = (D * F + 15) / 16 * 16, kk = (bs * bs + 15) / 16 * 16;
    return SUF(scratch_size)(D, bs) + 16 * kf + 4 * df + 8 * kk + 32;
}

static SUF(mlpb) SUF(mlpb_alloc)(S **p, int64_t D, int64_t F, int64_t bs) {
    SUF(mlpb) m;
    S **bufs[] = {&m.Z1, &m.X2, &m.gp1, &m.P1, &m.G1, &m.Z1b, &m.X2b, &m.X2e};
    for (int i = 0; i < 8; i++) *bufs[i] = SUF(take)(p, bs * F);
    m.S2 = SUF(take)(p, bs * bs);
    m.A2 = SUF(take)(p, bs * bs);
    m.W2T = SUF(take)(p, D * F);
    return m;
}

static void SUF(bias_rows)(int64_t K, int64_t n, const S *b, S *X) {
    for (int64_t i = 0; i < K; i++) memcpy(X + i * n, b, n * sizeof(S));
}

/* A loaded mini-batch (m: Q, K, T, e) at W1 [D][F], b1, W2 [F][D], b2:
   Z1 = K W1 + b1, X2 = gelu(Z1), Z2 = X2 W2 + b2 (its xh/rstd in m), G2 = LN-L2 backward (m->G),
   P1 = G2 W2^T, G1 = P1 gelu'(Z1), S1, A1 (m->Sm, m->A), Z1b = Q W1 + b1 - A1 G1, X2b = gelu(Z1b),
   S2 = X2b X2^T, A2, Zbar = X2b W2 + b2 - A2 G2 (its xh2/rstd2 in m). */
static void SUF(mlp_forward)(SUF(mb) *m, SUF(mlpb) *x, int64_t K, int64_t D, int64_t F, const S *tok, S eps,
                             const S *W1, const S *b1, const S *W2, const S *b2) {
    SUF(transpose)(W2, F, D, x->W2T);
    SUF(bias_rows)(K, F, b1, x->Z1);
    SUF(gemm)(K, F, D, 1, m->Kc, D, 1, W1, F, 1, x->Z1, F);
    SUF(gelu)(x->Z1, K * F, x->X2, x->gp1, NULL);
    SUF(bias_rows)(K, D, b2, m->xh);
    SUF(gemm)(K, D, F, 1, x->X2, F, 1, W2, D, 1, m->xh, D);
    SUF(ln_rows)(K, D, m->xh, eps, m->xh, m->rstd);
    SUF(ln_l2_fwd)(K, D, m->xh, m->rstd, m->Tc, m->g, m->be, m->gh, m->G);
    SUF(gemm)(K, F, D, 1, m->G, D, 1, x->W2T, F, 0, x->P1, F);
    for (int64_t i = 0; i < K * F; i++) x->G1[i] = x->P1[i] * x->gp1[i];
    SUF(mb_scores)(m, K, D, tok);
    SUF(bias_rows)(K, F, b1, x->Z1b);
    SUF(gemm)(K, F, D, 1, m->Qc, D, 1, W1, F, 1, x->Z1b, F);
    SUF(gemm)(K, F, K, -1, m->A, K, 1, x->G1, F, 1, x->Z1b, F);
    SUF(gelu)(x->Z1b, K * F, x->X2b, NULL, NULL);
    SUF(gemm_nt)(K, K, F, 1, x->X2b, F, x->X2, F, 0, x->S2, K);
    for (int64_t i = 0; i < K; i++)
        for (int64_t j = 0; j < K; j++)
            x->A2[i * K + j] = j <= i ? tok[i] * m->e[j] * (x->S2[i * K + j] + 1) : 0;
    SUF(bias_rows)(K, D, b2, m->xh2);
    SUF(gemm)(K, D, F, 1, x->X2b, F, 1, W2, D, 1, m->xh2, D);
    SUF(gemm)(K, D, K, -1, x->A2, K, 1, m->G, D, 1, m->xh2, D);
    SUF(ln_rows)(K, D, m->xh2, eps, m->xh2, m->rstd2);
}

/* Forward over all mini-batches. States per task: W1 [D][F], b1 [F], W2 [F][D], b2 [D] (W0 the
   initial ones, Wout the final ones, Wst [BH][N][...] each mini-batch's starting ones, 4 pointers
   each). */
int SUF(ttt_mlp_fwd)(const S *q, const S *k, const S *v, const S *eta, const int64_t *st, const S *tok,
                     const S *gamma, const S *beta, const S **W0, S **Wout, S **Wst, S *z, int64_t B, int64_t H,
                     int64_t T, int64_t D, int64_t F, int64_t bs, double eps_, int nthreads) {
    const int64_t N = (T + bs - 1) / bs;
    const int64_t sz[4] = {D * F, F, F * D, D};
    const S eps = (S)eps_;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t bi = bh / H, h = bh % H;
        SUF(mb) m;
        S *p, *block = SUF(task_begin)(SUF(mlp_scratch_size)(D, F, bs), D, bs, &m, &p, &failed);
        if (!block) continue;
        SUF(mlpb) x = SUF(mlpb_alloc)(&p, D, F, bs);
        SUF(mb_head)(&m, q, k, v, eta, st, gamma, beta, bi, h, D);
        S *W[4];
        for (int l = 0; l < 4; l++) {
            W[l] = Wout[l] + bh * sz[l];
            memcpy(W[l], W0[l] + bh * sz[l], sz[l] * sizeof(S));
        }
        for (int64_t n = 0; n < N; n++) {
            const int64_t t0 = n * bs, K = T - t0 < bs ? T - t0 : bs;
            for (int l = 0; l < 4; l++) memcpy(Wst[l] + (bh * N + n) * sz[l], W[l], sz[l] * sizeof(S));
            SUF(mb_load)(&m, t0, K, D, tok);
            SUF(mlp_forward)(&m, &x, K, D, F, tok, eps, W[0], W[1], W[2], W[3]);
            SUF(mb_store_z)(&m, K, D, z + ((bi * T + t0) * H + h) * D, H * D);
            /* W1 -= (e K)^T G1, b1 -= sum_j e_j G1_j, W2 -= (e X2)^T G2, b2 -= sum_j e_j G2_j */
            for (int64_t j = 0; j < K; j++) {
                for (int64_t d = 0; d < D; d++) m.Ke[j * D + d] = m.el[j] * m.Kc[j * D + d];
                for (int64_t f = 0; f < F; f++) x.X2e[j * F + f] = m.el[j] * x.X2[j * F + f];
            }
            SUF(gemm)(D, F, K, -1, m.Ke, 1, D, x.G1, F, 1, W[0], F);
            SUF(gemm)(F, D, K, -1, x.X2e, 1, F, m.G, D, 1, W[2], D);
            for (int64_t j = 0; j < K; j++) {
                for (int64_t f = 0; f < F; f++) W[1][f] -= m.el[j] * x.G1[j * F + f];
                for (int64_t d = 0; d < D; d++) W[3][d] -= m.el[j] * m.G[j * D + d];
            }
        }
        free(block);
    }
    return failed;
}

/* Backward: from dz and the final state's cotangents dWf (4 pointers, each NULL: zero) to the
   gradients of every input; dW0 (4 pointers) receives the initial state's. */
int SUF(ttt_mlp_bwd)(const S *q, const S *k, const S *v, const S *eta, const int64_t *st, const S *tok,
                     const S *gamma, const S *beta, const S **Wst, const S *dz, const S **dWf, S *dq, S *dk,
                     S *dv, S *deta, S *dtok, S *dgamma, S *dbeta, S **dW0, int64_t B, int64_t H, int64_t T,
                     int64_t D, int64_t F, int64_t bs, double eps_, int nthreads) {
    const int64_t N = (T + bs - 1) / bs;
    const int64_t sz[4] = {D * F, F, F * D, D};
    const S eps = (S)eps_;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t bi = bh / H, h = bh % H;
        const int64_t KF = bs * F;
        const int64_t n = SUF(mlp_scratch_size)(D, F, bs) + 10 * ((KF + 15) / 16 * 16) + 3 * D * F + 64;
        SUF(mb) m;
        S *p, *block = SUF(task_begin)(n, D, bs, &m, &p, &failed);
        if (!block) continue;
        SUF(mlpb) x = SUF(mlpb_alloc)(&p, D, F, bs);
        S *dZb = SUF(take)(&p, bs * D), *dG2 = SUF(take)(&p, bs * D), *dQ = SUF(take)(&p, bs * D);
        S *dK = SUF(take)(&p, bs * D), *dKe = SUF(take)(&p, bs * D), *dZ2 = SUF(take)(&p, bs * D);
        S *dxh = SUF(take)(&p, bs * D);
        S *dX2b = SUF(take)(&p, KF), *dX2 = SUF(take)(&p, KF), *dZ1b = SUF(take)(&p, KF);
        S *dG1 = SUF(take)(&p, KF), *dX2e = SUF(take)(&p, KF), *dZ1 = SUF(take)(&p, KF);
        S *gpb = SUF(take)(&p, KF), *gpp = SUF(take)(&p, KF);
        S *W1T = SUF(take)(&p, D * F), *dW1T = SUF(take)(&p, D * F), *dW2T = SUF(take)(&p, D * F);
        S *dA1 = SUF(take)(&p, bs * bs), *dA2 = SUF(take)(&p, bs * bs), *dS = SUF(take)(&p, bs * bs);
        S *del = SUF(take)(&p, bs);
        SUF(mb_head)(&m, q, k, v, eta, st, gamma, beta, bi, h, D);
        S *dW[4];
        for (int l = 0; l < 4; l++) {
            dW[l] = dW0[l] + bh * sz[l];
            if (dWf[l]) memcpy(dW[l], dWf[l] + bh * sz[l], sz[l] * sizeof(S));
            else memset(dW[l], 0, sz[l] * sizeof(S));
        }
        S *dtk = dtok + bh * bs, *dga = dgamma + bh * D, *dbe = dbeta + bh * D;
        memset(dtk, 0, bs * sizeof(S));
        memset(dga, 0, D * sizeof(S));
        memset(dbe, 0, D * sizeof(S));
        for (int64_t n = N - 1; n >= 0; n--) {
            const int64_t t0 = n * bs, K = T - t0 < bs ? T - t0 : bs;
            const S *W1 = Wst[0] + (bh * N + n) * sz[0], *b1 = Wst[1] + (bh * N + n) * sz[1];
            const S *W2 = Wst[2] + (bh * N + n) * sz[2], *b2 = Wst[3] + (bh * N + n) * sz[3];
            SUF(mb_load)(&m, t0, K, D, tok);
            SUF(mlp_forward)(&m, &x, K, D, F, tok, eps, W1, b1, W2, b2);
            SUF(transpose)(W1, D, F, W1T);
            SUF(gelu)(x.Z1b, K * F, NULL, gpb, NULL);
            SUF(gelu)(x.Z1, K * F, NULL, NULL, gpp);
            /* z = Q + LN(Zbar) */
            SUF(out_ln_bwd)(K, D, dz + ((bi * T + t0) * H + h) * D, H * D, m.xh2, m.rstd2, m.g, dQ, dga, dbe, dZb);
            /* Zbar = X2b W2 + b2 - A2 G2 */
            SUF(gemm)(K, F, D, 1, dZb, D, 1, x.W2T, F, 0, dX2b, F);
            SUF(gemm_nt)(K, K, D, -1, dZb, D, m.G, D, 0, dA2, K);
            SUF(gemm)(K, D, K, -1, x.A2, 1, K, dZb, D, 0, dG2, D);
            /* A2 = tril(E (X2b X2^T + 1)) */
            for (int64_t i = 0; i < K; i++)
                for (int64_t j = 0; j < K; j++) dS[i * K + j] = j <= i ? dA2[i * K + j] * tok[i] * m.e[j] : 0;
            SUF(gemm)(K, F, K, 1, dS, K, 1, x.X2, F, 1, dX2b, F);
            SUF(gemm)(K, F, K, 1, dS, 1, K, x.X2b, F, 0, dX2, F);
            /* X2b = gelu(Z1b); Z1b = Q W1 + b1 - A1 G1 */
            for (int64_t i = 0; i < K * F; i++) dZ1b[i] = dX2b[i] * gpb[i];
            SUF(gemm)(K, D, F, 1, dZ1b, F, 1, W1T, D, 1, dQ, D);
            SUF(gemm_nt)(K, K, F, -1, dZ1b, F, x.G1, F, 0, dA1, K);
            SUF(gemm)(K, F, K, -1, m.A, 1, K, dZ1b, F, 0, dG1, F);
            /* A1 = tril(E (Q K^T + 1)) */
            for (int64_t i = 0; i < K; i++)
                for (int64_t j = 0; j < K; j++) dS[i * K + j] = j <= i ? dA1[i * K + j] * tok[i] * m.e[j] : 0;
            SUF(gemm)(K, D, K, 1, dS, K, 1, m.Kc, D, 1, dQ, D);
            SUF(gemm)(K, D, K, 1, dS, 1, K, m.Qc, D, 0, dK, D);
            /* the state update, with dW the gradients of the state after the mini-batch */
            for (int64_t j = 0; j < K; j++) {
                for (int64_t d = 0; d < D; d++) m.Ke[j * D + d] = m.el[j] * m.Kc[j * D + d];
                for (int64_t f = 0; f < F; f++) x.X2e[j * F + f] = m.el[j] * x.X2[j * F + f];
            }
            SUF(transpose)(dW[0], D, F, dW1T);
            SUF(transpose)(dW[2], F, D, dW2T);
            SUF(gemm)(K, D, F, -1, x.G1, F, 1, dW1T, D, 0, dKe, D);
            SUF(gemm)(K, F, D, -1, m.Ke, D, 1, dW[0], F, 1, dG1, F);
            SUF(gemm)(K, F, D, -1, m.G, D, 1, dW2T, F, 0, dX2e, F);
            SUF(gemm)(K, D, F, -1, x.X2e, F, 1, dW[2], D, 1, dG2, D);
            for (int64_t j = 0; j < K; j++) {
                S s = 0;
                for (int64_t d = 0; d < D; d++) {
                    s += m.Kc[j * D + d] * dKe[j * D + d] - m.G[j * D + d] * dW[3][d];
                    dG2[j * D + d] -= m.el[j] * dW[3][d];
                    dK[j * D + d] += m.el[j] * dKe[j * D + d];
                }
                for (int64_t f = 0; f < F; f++) {
                    s += x.X2[j * F + f] * dX2e[j * F + f] - x.G1[j * F + f] * dW[1][f];
                    dG1[j * F + f] -= m.el[j] * dW[1][f];
                    dX2[j * F + f] += m.el[j] * dX2e[j * F + f];
                }
                del[j] = s;
                dtk[K - 1] += m.e[j] * s;
            }
            SUF(eta_bwd)(K, tok, m.e, del, dA1, m.Sm, dA2, x.S2, deta + (bi * T + t0) * H + h, H, dtk);
            /* the gradients of W1, b1, W2, b2 through Z1b and Zbar (after dW was used above) */
            SUF(gemm)(F, D, K, 1, x.X2b, 1, F, dZb, D, 1, dW[2], D);
            SUF(gemm)(D, F, K, 1, m.Qc, 1, D, dZ1b, F, 1, dW[0], F);
            for (int64_t i = 0; i < K; i++) {
                for (int64_t d = 0; d < D; d++) dW[3][d] += dZb[i * D + d];
                for (int64_t f = 0; f < F; f++) dW[1][f] += dZ1b[i * F + f];
            }
            /* G1 = P1 gelu'(Z1), P1 = G2 W2^T: dP1 (in dX2e) = dG1 gelu'(Z1), dZ1 = dG1 P1 gelu''(Z1) */
            for (int64_t i = 0; i < K * F; i++) {
                dX2e[i] = dG1[i] * x.gp1[i];
                dZ1[i] = dG1[i] * x.P1[i] * gpp[i];
            }
            SUF(gemm)(K, D, F, 1, dX2e, F, 1, W2, D, 1, dG2, D);
            SUF(gemm)(F, D, K, 1, dX2e, 1, F, m.G, D, 1, dW[2], D);
            /* G2 = LN-L2 backward at Z2 */
            SUF(ln_l2_bwd)(K, D, m.xh, m.rstd, m.gh, m.G, m.Tc, m.g, m.be, dG2, dxh, dga, dbe,
                           dv + ((bi * T + t0) * H + h) * D, H * D, dK, dZ2);
            /* Z2 = X2 W2 + b2, X2 = gelu(Z1), Z1 = K W1 + b1 */
            SUF(gemm)(K, F, D, 1, dZ2, D, 1, x.W2T, F, 1, dX2, F);
            SUF(gemm)(F, D, K, 1, x.X2, 1, F, dZ2, D, 1, dW[2], D);
            for (int64_t i = 0; i < K * F; i++) dZ1[i] += dX2[i] * x.gp1[i];
            SUF(gemm)(K, D, F, 1, dZ1, F, 1, W1T, D, 1, dK, D);
            SUF(gemm)(D, F, K, 1, m.Kc, 1, D, dZ1, F, 1, dW[0], F);
            for (int64_t i = 0; i < K; i++) {
                for (int64_t d = 0; d < D; d++) dW[3][d] += dZ2[i * D + d];
                for (int64_t f = 0; f < F; f++) dW[1][f] += dZ1[i * F + f];
            }
            SUF(store_rows)(K, D, dQ, dq + ((bi * T + t0) * H + h) * D, H * D);
            SUF(store_rows)(K, D, dK, dk + ((bi * T + t0) * H + h) * D, H * D);
        }
        free(block);
    }
    return failed;
}

#undef GELU_C
#undef GELU_A
