/* Body of ttt_linear.c for one scalar type: included once with S = float (SUF _f32) and once
   with S = double (_f64), after small_matrix_impl.h for the same type. See ttt_linear.c for the
   math and layouts. */

/* Per-task scratch: a bump allocator over one block (16-element steps). */
static S *SUF(take)(S **p, int64_t n) {
    S *r = *p;
    *p += (n + 15) / 16 * 16;
    return r;
}

/* Scratch of one task, in elements: the mini-batch's buffers (mb_alloc) plus the backward's. */
static int64_t SUF(scratch_size)(int64_t D, int64_t bs) {
    return (16 * ((bs * D + 15) / 16 * 16) + 2 * ((D * D + 15) / 16 * 16) + 4 * ((bs * bs + 15) / 16 * 16)
            + 6 * ((bs + 15) / 16 * 16));
}

/* Per row of x [K][D] (in place allowed): xh = (x - mean) / sqrt(var + eps), rstd = 1 / sqrt(var + eps). */
static void SUF(ln_rows)(int64_t K, int64_t D, const S *x, S eps, S *xh, S *rstd) {
    for (int64_t i = 0; i < K; i++) {
        const S *r = x + i * D;
        S *o = xh + i * D;
        S mu = 0, var = 0;
#pragma omp simd reduction(+ : mu)
        for (int64_t d = 0; d < D; d++) mu += r[d];
        mu /= (S)D;
#pragma omp simd reduction(+ : var)
        for (int64_t d = 0; d < D; d++) var += (r[d] - mu) * (r[d] - mu);
        const S rs = (S)1 / sqrt(var / (S)D + eps);
#pragma omp simd
        for (int64_t d = 0; d < D; d++) o[d] = (r[d] - mu) * rs;
        rstd[i] = rs;
    }
}

/* The inner gradient G = d/dZ 1/2 ||gamma xh + beta - t||^2 from Z's LayerNorm (xh, rstd):
   gh = (gamma xh + beta - t) gamma, G = rstd (gh - mean(gh) - xh mean(gh xh)). */
static void SUF(ln_l2_fwd)(int64_t K, int64_t D, const S *xh, const S *rstd, const S *t, const S *g,
                           const S *be, S *gh, S *G) {
    for (int64_t i = 0; i < K; i++) {
        const S *x = xh + i * D, *ti = t + i * D;
        S *h = gh + i * D, *o = G + i * D;
        S m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
        for (int64_t d = 0; d < D; d++) {
            h[d] = (g[d] * x[d] + be[d] - ti[d]) * g[d];
            m1 += h[d];
            m2 += h[d] * x[d];
        }
        m1 /= (S)D;
        m2 /= (S)D;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) o[d] = rstd[i] * (h[d] - m1 - x[d] * m2);
    }
}

/* Backward of z = Q + LN(Zbar) over K rows: dQ = dz (rows of dz at stride ldz), dZbar through
   the LayerNorm (xh2, rstd2 of Zbar), d gamma and d beta accumulated. */
static void SUF(out_ln_bwd)(int64_t K, int64_t D, const S *dz, int64_t ldz, const S *xh2, const S *rstd2,
                            const S *g, S *dQ, S *dga, S *dbe, S *dZb) {
    for (int64_t i = 0; i < K; i++) {
        const S *dzr = dz + i * ldz, *x = xh2 + i * D;
        S *o = dZb + i * D, m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
        for (int64_t d = 0; d < D; d++) {
            dQ[i * D + d] = dzr[d];
            dga[d] += dzr[d] * x[d];
            dbe[d] += dzr[d];
            o[d] = dzr[d] * g[d];
            m1 += o[d];
            m2 += o[d] * x[d];
        }
        m1 /= (S)D;
        m2 /= (S)D;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) o[d] = rstd2[i] * (o[d] - m1 - x[d] * m2);
    }
}

/* Backward of G = LN-L2 backward at Z (xh, rstd of Z, gh, G, target rows t) over K rows: from dG
   to dZ, d target written to dv (rows at stride ldv) and subtracted from dK (t = V - K), d gamma
   and d beta accumulated (README.md, step 5). dxh scratch [K][D]. */
static void SUF(ln_l2_bwd)(int64_t K, int64_t D, const S *xh, const S *rstd, const S *gh, const S *G, const S *t,
                           const S *g, const S *be, const S *dG, S *dxh, S *dga, S *dbe, S *dv, int64_t ldv,
                           S *dK, S *dZ) {
    for (int64_t i = 0; i < K; i++) {
        const S *x = xh + i * D, *h2 = gh + i * D, *Gi = G + i * D, *ti = t + i * D;
        const S *dGi = dG + i * D, rs = rstd[i];
        S *dx = dxh + i * D, *dZi = dZ + i * D, *dvi = dv + i * ldv;
        S mg = 0, mgx = 0, mhx = 0, dstd = 0;
#pragma omp simd reduction(+ : mg, mgx, mhx, dstd)
        for (int64_t d = 0; d < D; d++) {
            mg += dGi[d];
            mgx += dGi[d] * x[d];
            mhx += h2[d] * x[d];
            dstd += dGi[d] * Gi[d];
        }
        mg /= (S)D;
        mgx /= (S)D;
        mhx /= (S)D;
        dstd *= -rs;
        S m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
        for (int64_t d = 0; d < D; d++) {
            const S P = rs * (dGi[d] - mg - x[d] * mgx);
            dx[d] = -rs * (dGi[d] * mhx + h2[d] * mgx) + P * g[d] * g[d];
            dga[d] += P * ((S)2 * g[d] * x[d] + be[d] - ti[d]);
            dbe[d] += P * g[d];
            const S dt = -P * g[d];
            dvi[d] = dt;
            dK[i * D + d] -= dt;
            m1 += dx[d];
            m2 += dx[d] * x[d];
        }
        m1 /= (S)D;
        m2 /= (S)D;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) dZi[d] = rs * (dx[d] - m1 - x[d] * m2) + dstd * x[d] / (S)D;
    }
}

/* One task's (batch row, head) mini-batch buffers, and where the task reads: its LayerNorm rows
   g, be and the bases of q, k, v, eta with their 12 strides st (set by mb_head). */
typedef struct {
    S *Qc, *Kc, *Tc, *xh, *gh, *G, *xh2, *Ke, *e, *el, *rstd, *rstd2, *Sm, *A;
    const S *g, *be, *qb, *kb, *vb, *eb;
    const int64_t *st;
} SUF(mb);

/* Points m at task (bi, h)'s inputs; st: (batch, time, head) strides of q, k, v, eta. */
static void SUF(mb_head)(SUF(mb) *m, const S *q, const S *k, const S *v, const S *eta, const int64_t *st,
                         const S *gamma, const S *beta, int64_t bi, int64_t h, int64_t D) {
    m->g = gamma + h * D;
    m->be = beta + h * D;
    m->qb = q + bi * st[0] + h * st[2];
    m->kb = k + bi * st[3] + h * st[5];
    m->vb = v + bi * st[6] + h * st[8];
    m->eb = eta + bi * st[9] + h * st[11];
    m->st = st;
}

/* Loads the mini-batch [t0, t0 + K): Q, K, T = V - K, eta (e) and e_last (el). */
static void SUF(mb_load)(SUF(mb) *m, int64_t t0, int64_t K, int64_t D, const S *tok) {
    const S *qb = m->qb, *kb = m->kb, *vb = m->vb, *eb = m->eb;
    const int64_t *st = m->st;
    for (int64_t i = 0; i < K; i++) {
        const S *qr = qb + (t0 + i) * st[1], *kr = kb + (t0 + i) * st[4], *vr = vb + (t0 + i) * st[7];
#pragma omp simd
        for (int64_t d = 0; d < D; d++) {
            m->Qc[i * D + d] = qr[d];
            m->Kc[i * D + d] = kr[d];
            m->Tc[i * D + d] = vr[d] - kr[d];
        }
        m->e[i] = eb[(t0 + i) * st[10]];
        m->el[i] = tok[K - 1] * m->e[i];
    }
}

/* The output rows z = Q + gamma LN(Zbar) + beta of a formed mini-batch, to zr (rows at stride ldz). */
static void SUF(mb_store_z)(const SUF(mb) *m, int64_t K, int64_t D, S *zr, int64_t ldz) {
    for (int64_t i = 0; i < K; i++) {
        S *o = zr + i * ldz;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) o[d] = m->Qc[i * D + d] + m->xh2[i * D + d] * m->g[d] + m->be[d];
    }
}

/* K rows of D from src (contiguous) to dst (rows at stride ld). */
static void SUF(store_rows)(int64_t K, int64_t D, const S *src, S *dst, int64_t ld) {
    for (int64_t i = 0; i < K; i++) memcpy(dst + i * ld, src + i * D, D * sizeof(S));
}

/* d eta (rows at stride ldeta) and d token_eta (dtk, accumulated) of a mini-batch through
   A = tril(E * (S + 1)), E[i][j] = tok[i] e_j, given dA, S, and del[j], the gradient of e_j's
   state-update terms (which add del[j] tok[K-1] to d eta_j); dA2, S2 a second such matrix with
   the same E (TTT-MLP's A2) or NULL. */
static void SUF(eta_bwd)(int64_t K, const S *tok, const S *e, const S *del, const S *dA, const S *Sm,
                         const S *dA2, const S *S2, S *deta, int64_t ldeta, S *dtk) {
    for (int64_t j = 0; j < K; j++) {
        S de = tok[K - 1] * del[j];
        for (int64_t i = j; i < K; i++) {
            S a = dA[i * K + j] * (Sm[i * K + j] + 1);
            if (dA2) a += dA2[i * K + j] * (S2[i * K + j] + 1);
            de += a * tok[i];
        }
        deta[j * ldeta] = de;
    }
    for (int64_t i = 0; i < K; i++)
        for (int64_t j = 0; j <= i; j++) {
            S a = dA[i * K + j] * (Sm[i * K + j] + 1);
            if (dA2) a += dA2[i * K + j] * (S2[i * K + j] + 1);
            dtk[i] += a * e[j];
        }
}

/* S = Q K^T and A = tril(E * (S + 1)) of a loaded mini-batch. */
static void SUF(mb_scores)(SUF(mb) *m, int64_t K, int64_t D, const S *tok) {
    SUF(gemm_nt)(K, K, D, 1, m->Qc, D, m->Kc, D, 0, m->Sm, K);
    for (int64_t i = 0; i < K; i++)
        for (int64_t j = 0; j < K; j++)
            m->A[i * K + j] = j <= i ? tok[i] * m->e[j] * (m->Sm[i * K + j] + 1) : 0;
}

/* The mini-batch [t0, t0 + K) at weights W, c: loads it (mb_load); forms xh/rstd of
   Z = K W + c, gh, G, S = Q K^T, A, and xh2/rstd2 of Zbar = Q W + c - A G. */
static void SUF(mb_forward)(SUF(mb) *m, int64_t t0, int64_t K, int64_t D, const S *tok, S eps, const S *W,
                            const S *c) {
    SUF(mb_load)(m, t0, K, D, tok);
    for (int64_t i = 0; i < K; i++) {
        memcpy(m->xh + i * D, c, D * sizeof(S));
        memcpy(m->xh2 + i * D, c, D * sizeof(S));
    }
    SUF(gemm)(K, D, D, 1, m->Kc, D, 1, W, D, 1, m->xh, D);
    SUF(ln_rows)(K, D, m->xh, eps, m->xh, m->rstd);
    SUF(ln_l2_fwd)(K, D, m->xh, m->rstd, m->Tc, m->g, m->be, m->gh, m->G);
    SUF(mb_scores)(m, K, D, tok);
    SUF(gemm)(K, D, D, 1, m->Qc, D, 1, W, D, 1, m->xh2, D);
    SUF(gemm)(K, D, K, -1, m->A, K, 1, m->G, D, 1, m->xh2, D);
    SUF(ln_rows)(K, D, m->xh2, eps, m->xh2, m->rstd2);
}

static SUF(mb) SUF(mb_alloc)(S **p, int64_t D, int64_t bs) {
    SUF(mb) m;
    S **bufs[] = {&m.Qc, &m.Kc, &m.Tc, &m.xh, &m.gh, &m.G, &m.xh2, &m.Ke};
    for (int i = 0; i < 8; i++) *bufs[i] = SUF(take)(p, bs * D);
    m.e = SUF(take)(p, bs);
    m.el = SUF(take)(p, bs);
    m.rstd = SUF(take)(p, bs);
    m.rstd2 = SUF(take)(p, bs);
    m.Sm = SUF(take)(p, bs * bs);
    m.A = SUF(take)(p, bs * bs);
    return m;
}

/* A task's scratch block of n elements (the caller frees it), the mini-batch buffers at its start
   (*m) and *p past them; NULL, with *failed set, where it cannot be allocated. */
static S *SUF(task_begin)(int64_t n, int64_t D, int64_t bs, SUF(mb) *m, S **p, int *failed) {
    S *block = malloc(n * sizeof(S));
    if (!block) {
#pragma omp atomic write
        *failed = 1;
        return NULL;
    }
    *p = block;
    *m = SUF(mb_alloc)(p, D, bs);
    return block;
}

/* Forward over all mini-batches; see ttt_linear.c for the argument layouts. st: 12 strides,
   (batch, time, head) of q, k, v, eta. Returns 0, or 1 if scratch could not be allocated. */
int SUF(ttt_linear_fwd)(const S *q, const S *k, const S *v, const S *eta, const int64_t *st, const S *tok,
                        const S *gamma, const S *beta, const S *W0, const S *c0, S *Wout, S *cout, S *Wst,
                        S *cst, S *z, int64_t B, int64_t H, int64_t T, int64_t D, int64_t bs, double eps_,
                        int nthreads) {
    const int64_t N = (T + bs - 1) / bs;
    const S eps = (S)eps_;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t bi = bh / H, h = bh % H;
        SUF(mb) m;
        S *p, *block = SUF(task_begin)(SUF(scratch_size)(D, bs), D, bs, &m, &p, &failed);
        if (!block) continue;
        SUF(mb_head)(&m, q, k, v, eta, st, gamma, beta, bi, h, D);
        S *W = Wout + bh * D * D, *c = cout + bh * D;
        memcpy(W, W0 + bh * D * D, D * D * sizeof(S));
        memcpy(c, c0 + bh * D, D * sizeof(S));
        for (int64_t n = 0; n < N; n++) {
            const int64_t t0 = n * bs, K = T - t0 < bs ? T - t0 : bs;
            memcpy(Wst + (bh * N + n) * D * D, W, D * D * sizeof(S));
            memcpy(cst + (bh * N + n) * D, c, D * sizeof(S));
            SUF(mb_forward)(&m, t0, K, D, tok, eps, W, c);
            SUF(mb_store_z)(&m, K, D, z + ((bi * T + t0) * H + h) * D, H * D);
            /* W -= (e K)^T G, c -= sum_j e_j G_j */
            for (int64_t j = 0; j < K; j++)
#pragma omp simd
                for (int64_t d = 0; d < D; d++) m.Ke[j * D + d] = m.el[j] * m.Kc[j * D + d];
            SUF(gemm)(D, D, K, -1, m.Ke, 1, D, m.G, D, 1, W, D);
            for (int64_t j = 0; j < K; j++)
#pragma omp simd
                for (int64_t d = 0; d < D; d++) c[d] -= m.el[j] * m.G[j * D + d];
        }
        free(block);
    }
    return failed;
}

/* Backward: from dz (and dWf, dcf, the cotangents of the final state, NULL: zero) to the
   gradients of every input; see ttt_linear.c for the layouts. */
int SUF(ttt_linear_bwd)(const S *q, const S *k, const S *v, const S *eta, const int64_t *st, const S *tok,
                        const S *gamma, const S *beta, const S *Wst, const S *cst, const S *dz, const S *dWf,
                        const S *dcf, S *dq, S *dk, S *dv, S *deta, S *dtok, S *dgamma, S *dbeta, S *dW0,
                        S *dc0, int64_t B, int64_t H, int64_t T, int64_t D, int64_t bs, double eps_,
                        int nthreads) {
    const int64_t N = (T + bs - 1) / bs;
    const S eps = (S)eps_;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t bi = bh / H, h = bh % H;
        SUF(mb) m;
        S *p, *block = SUF(task_begin)(SUF(scratch_size)(D, bs), D, bs, &m, &p, &failed);
        if (!block) continue;
        S *dZb = SUF(take)(&p, bs * D), *dG = SUF(take)(&p, bs * D);
        S *dQ = SUF(take)(&p, bs * D), *dK = SUF(take)(&p, bs * D), *dKe = SUF(take)(&p, bs * D);
        S *dZ = SUF(take)(&p, bs * D), *dxh = SUF(take)(&p, bs * D);
        S *WT = SUF(take)(&p, D * D), *dWT = SUF(take)(&p, D * D);
        S *dA = SUF(take)(&p, bs * bs), *dS = SUF(take)(&p, bs * bs), *del = SUF(take)(&p, bs);
        SUF(mb_head)(&m, q, k, v, eta, st, gamma, beta, bi, h, D);
        S *dW = dW0 + bh * D * D, *dc = dc0 + bh * D;
        S *dtk = dtok + bh * bs, *dga = dgamma + bh * D, *dbe = dbeta + bh * D;
        if (dWf) memcpy(dW, dWf + bh * D * D, D * D * sizeof(S)); else memset(dW, 0, D * D * sizeof(S));
        if (dcf) memcpy(dc, dcf + bh * D, D * sizeof(S)); else memset(dc, 0, D * sizeof(S));
        memset(dtk, 0, bs * sizeof(S));
        memset(dga, 0, D * sizeof(S));
        memset(dbe, 0, D * sizeof(S));
        for (int64_t n = N - 1; n >= 0; n--) {
            const int64_t t0 = n * bs, K = T - t0 < bs ? T - t0 : bs;
            const S *W = Wst + (bh * N + n) * D * D, *c = cst + (bh * N + n) * D;
            SUF(mb_forward)(&m, t0, K, D, tok, eps, W, c);
            SUF(transpose)(W, D, D, WT);
            /* z = Q + LN(Zbar): dQ = dz, dZbar through the LayerNorm */
            SUF(out_ln_bwd)(K, D, dz + ((bi * T + t0) * H + h) * D, H * D, m.xh2, m.rstd2, m.g, dQ, dga, dbe, dZb);
            /* Zbar = Q W + c - A G */
            SUF(gemm)(K, D, D, 1, dZb, D, 1, WT, D, 1, dQ, D);
            SUF(gemm_nt)(K, K, D, -1, dZb, D, m.G, D, 0, dA, K);
            SUF(gemm)(K, D, K, -1, m.A, 1, K, dZb, D, 0, dG, D);
            /* W' = W - (e K)^T G, c' = c - sum_j e_j G_j, with dW, dc the gradients of W', c' */
            for (int64_t j = 0; j < K; j++)
#pragma omp simd
                for (int64_t d = 0; d < D; d++) m.Ke[j * D + d] = m.el[j] * m.Kc[j * D + d];
            SUF(transpose)(dW, D, D, dWT);
            SUF(gemm)(K, D, D, -1, m.G, D, 1, dWT, D, 0, dKe, D);
            SUF(gemm)(K, D, D, -1, m.Ke, D, 1, dW, D, 1, dG, D);
            for (int64_t j = 0; j < K; j++) {
                S s = 0;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < D; d++) {
                    dG[j * D + d] -= m.el[j] * dc[d];
                    s += m.Kc[j * D + d] * dKe[j * D + d] - m.G[j * D + d] * dc[d];
                    dK[j * D + d] = m.el[j] * dKe[j * D + d];
                }
                del[j] = s;
                dtk[K - 1] += m.e[j] * s;
            }
            SUF(eta_bwd)(K, tok, m.e, del, dA, m.Sm, NULL, NULL, deta + (bi * T + t0) * H + h, H, dtk);
            /* A = tril(E * (S + 1)), E[i][j] = tok[i] e_j */
            for (int64_t i = 0; i < K; i++)
                for (int64_t j = 0; j < K; j++) dS[i * K + j] = j <= i ? dA[i * K + j] * tok[i] * m.e[j] : 0;
            SUF(gemm)(K, D, K, 1, dS, K, 1, m.Kc, D, 1, dQ, D);
            SUF(gemm)(K, D, K, 1, dS, 1, K, m.Qc, D, 1, dK, D);
            /* the gradients of W, c through Zbar (after dW' was used above) */
            SUF(gemm)(D, D, K, 1, m.Qc, 1, D, dZb, D, 1, dW, D);
            for (int64_t i = 0; i < K; i++)
#pragma omp simd
                for (int64_t d = 0; d < D; d++) dc[d] += dZb[i * D + d];
            /* G = LN-L2 backward at Z (xh, rstd, gh): dG -> dZ, d target (= dV, -dK), dgamma, dbeta */
            SUF(ln_l2_bwd)(K, D, m.xh, m.rstd, m.gh, m.G, m.Tc, m.g, m.be, dG, dxh, dga, dbe,
                           dv + ((bi * T + t0) * H + h) * D, H * D, dK, dZ);
            /* Z = K W + c */
            SUF(gemm)(K, D, D, 1, dZ, D, 1, WT, D, 1, dK, D);
            SUF(gemm)(D, D, K, 1, m.Kc, 1, D, dZ, D, 1, dW, D);
            for (int64_t i = 0; i < K; i++)
#pragma omp simd
                for (int64_t d = 0; d < D; d++) dc[d] += dZ[i * D + d];
            SUF(store_rows)(K, D, dQ, dq + ((bi * T + t0) * H + h) * D, H * D);
            SUF(store_rows)(K, D, dK, dk + ((bi * T + t0) * H + h) * D, H * D);
        }
        free(block);
    }
    return failed;
}
