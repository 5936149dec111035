/* Small dense matrix helpers for the fused CPU chains (plain C99 + GCC vector extensions), for one
   scalar type: a kernel includes this once per type with S (float or double) and SUF(name)
   (name##_f32 or name##_f64) defined, so both variants sit in one library.

   Sized for what the recurrent chains multiply: a mini-batch or chunk of 16-64 rows against a
   head's weights (64-128 wide), all in L1/L2. Products go through register-blocked loops (up to
   16 vector accumulators) so a [16 x 64] x [64 x 64] product runs at FMA speed instead of
   BLAS's call overhead.

   Shared by kernels/ttt/csrc. The Titans chain (kernels/titans_memory/csrc/chunk_memory_impl.h)
   carries its own copy of `gemm` and `transpose` (the same code) and has not been switched over
   yet. Defines: SUF(vec), SUF(uvec), SUF(gemm), SUF(gemm_nt), SUF(transpose); uses the macros
   SM_VEC, SM_UVEC, SM_NV internally and undefines them at the end. */

#include <stdint.h>

typedef S SUF(vec) __attribute__((vector_size(64)));
/* the same vector at element alignment: loads and stores of it are unaligned moves */
typedef S SUF(uvec) __attribute__((vector_size(64), aligned(sizeof(S))));
#define SM_VEC SUF(vec)
#define SM_UVEC SUF(uvec)
#define SM_NV ((int64_t)(64 / sizeof(S)))

/* C[R rows][NVB*NV cols] = beta C + alpha A B over k, accumulators in registers. A points at the
   block's first row (row stride ars, column stride acs), B and C at its first column. */
#define SM_DEFINE_BLOCK(R, NVB)                                                                   \
static inline void SUF(sm_block_##R##_##NVB)(int64_t k, S alpha, const S *A, int64_t ars,        \
                                             int64_t acs, const S *B, int64_t ldb, S beta, S *C,  \
                                             int64_t ldc) {                                       \
    SM_VEC acc[R][NVB];                                                                           \
    for (int r = 0; r < R; r++)                                                                   \
        for (int u = 0; u < NVB; u++) acc[r][u] = (SM_VEC){0};                                    \
    for (int64_t kk = 0; kk < k; kk++) {                                                          \
        SM_VEC bv[NVB];                                                                           \
        for (int u = 0; u < NVB; u++) bv[u] = *(const SM_UVEC *)(B + kk * ldb + u * SM_NV);       \
        for (int r = 0; r < R; r++) {                                                             \
            const S a = A[r * ars + kk * acs];                                                    \
            for (int u = 0; u < NVB; u++) acc[r][u] += a * bv[u];                                 \
        }                                                                                         \
    }                                                                                             \
    for (int r = 0; r < R; r++)                                                                   \
        for (int u = 0; u < NVB; u++) {                                                           \
            SM_UVEC *c = (SM_UVEC *)(C + r * ldc + u * SM_NV);                                    \
            *c = beta != 0 ? beta * *c + alpha * acc[r][u] : alpha * acc[r][u];                   \
        }                                                                                         \
}

SM_DEFINE_BLOCK(4, 4)
SM_DEFINE_BLOCK(8, 1)
SM_DEFINE_BLOCK(4, 1)
SM_DEFINE_BLOCK(1, 4)
SM_DEFINE_BLOCK(1, 1)
#undef SM_DEFINE_BLOCK

/* C[m][n] (row stride ldc) = beta C + alpha A B, A [m][k] read at A[i ars + kk acs] (so A^T is
   ars = 1, acs = its row length), B [k][n] row-major (row stride ldb). beta == 0 does not read C. */
static void SUF(gemm)(int64_t m, int64_t n, int64_t k, S alpha, const S *A, int64_t ars, int64_t acs,
                      const S *B, int64_t ldb, S beta, S *C, int64_t ldc) {
    const int64_t nb4 = n / (4 * SM_NV) * (4 * SM_NV), nb1 = n / SM_NV * SM_NV;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4)
        for (int64_t j = 0; j < nb4; j += 4 * SM_NV)
            SUF(sm_block_4_4)(k, alpha, A + i * ars, ars, acs, B + j, ldb, beta, C + i * ldc + j, ldc);
    for (; i < m; i++)
        for (int64_t j = 0; j < nb4; j += 4 * SM_NV)
            SUF(sm_block_1_4)(k, alpha, A + i * ars, ars, acs, B + j, ldb, beta, C + i * ldc + j, ldc);
    /* the remaining whole vectors: 8 rows at a time, so 8 independent accumulators hide the FMA
       latency */
    for (int64_t j = nb4; j < nb1; j += SM_NV) {
        int64_t r = 0;
        for (; r + 8 <= m; r += 8)
            SUF(sm_block_8_1)(k, alpha, A + r * ars, ars, acs, B + j, ldb, beta, C + r * ldc + j, ldc);
        for (; r + 4 <= m; r += 4)
            SUF(sm_block_4_1)(k, alpha, A + r * ars, ars, acs, B + j, ldb, beta, C + r * ldc + j, ldc);
        for (; r < m; r++)
            SUF(sm_block_1_1)(k, alpha, A + r * ars, ars, acs, B + j, ldb, beta, C + r * ldc + j, ldc);
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

/* C[m][n] = beta C + alpha A B^T with A [m][k], B [n][k] row-major (row strides lda, ldb): dot
   products of rows, for the small [b x b] products of a mini-batch (Q K^T and the like). */
static void SUF(gemm_nt)(int64_t m, int64_t n, int64_t k, S alpha, const S *A, int64_t lda, const S *B,
                         int64_t ldb, S beta, S *C, int64_t ldc) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            const S *a = A + i * lda, *b = B + j * ldb;
            S s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t kk = 0; kk < k; kk++) s += a[kk] * b[kk];
            S *c = C + i * ldc + j;
            *c = beta != 0 ? beta * *c + alpha * s : alpha * s;
        }
}

/* dst [c][r] = src [r][c]^T. Full NV x NV tiles go through registers: log2(NV) rounds of
   two-vector shuffles, round s swapping bit s of the row and column index (64 shuffles per 16 x 16
   float tile, against 256 scalar moves); the edges are scalar. */
typedef int32_t SUF(sm_ivec) __attribute__((vector_size(64 * sizeof(int32_t) / sizeof(S))));
typedef int64_t SUF(sm_lvec) __attribute__((vector_size(64)));
#define SM_MASKVEC __typeof__(__builtin_choose_expr(sizeof(S) == 4, (SUF(sm_ivec)){0}, (SUF(sm_lvec)){0}))
static void SUF(transpose)(const S *src, int64_t r, int64_t c, S *dst) {
    /* masks of round s: lo keeps row i's low half of each 2s block, hi the high (built per call:
       a few dozen stores, and no state shared by the OpenMP threads) */
    SM_MASKVEC lo[8], hi[8];
    for (int e = 0, st = 1; st < SM_NV; e++, st *= 2)
        for (int j = 0; j < SM_NV; j++) {
            lo[e][j] = (j & st) ? SM_NV + j - st : j;
            hi[e][j] = (j & st) ? SM_NV + j : j + st;
        }
    const int64_t rt = r / SM_NV * SM_NV, ct = c / SM_NV * SM_NV;
    for (int64_t i0 = 0; i0 < rt; i0 += SM_NV)
        for (int64_t j0 = 0; j0 < ct; j0 += SM_NV) {
            SM_VEC v[SM_NV];
            for (int i = 0; i < SM_NV; i++) v[i] = *(const SM_UVEC *)(src + (i0 + i) * c + j0);
            for (int e = 0, st = 1; st < SM_NV; e++, st *= 2)
                for (int i = 0; i < SM_NV; i++)
                    if (!(i & st)) {
                        const SM_VEC a = v[i], b2 = v[i + st];
                        v[i] = __builtin_shuffle(a, b2, lo[e]);
                        v[i + st] = __builtin_shuffle(a, b2, hi[e]);
                    }
            for (int j = 0; j < SM_NV; j++) *(SM_UVEC *)(dst + (j0 + j) * r + i0) = v[j];
        }
    for (int64_t i = 0; i < r; i++)
        for (int64_t j = (i < rt ? ct : 0); j < c; j++) dst[j * r + i] = src[i * c + j];
}
#undef SM_MASKVEC

#undef SM_VEC
#undef SM_UVEC
#undef SM_NV
