/* Titans memory chunk chain, forward and backward, fused for CPU (plain C99 + GCC vector
   extensions + OpenMP).

   Built and loaded by kernels/native.py, called through ctypes by ../fused_cpu.py. The math is
   that of ../chunk.py (`_chain_forward`, `_chain_backward`) and is derived in ../README.md. Per
   chunk of b tokens, with the chunk-start weights W_l and momentum S_l of an L-layer memory MLP:

       x_0 = k,  z_l = x_l W_l,  x_{l+1} = act(z_l)                         (key rows)
       delta_{L-1} = 2 (z_{L-1} - v),  delta_l = (delta_{l+1} W_{l+1}^T) * act'(z_l)
       W_l' = a W_l + b_M S_l - x_l^T diag(c_M) delta_l,   S_l' = b_S S_l - x_l^T diag(c_S) delta_l
       o = M(q) at W (the read of the chunk's queries, run stacked with the key rows)

   A task is one (batch, head) row; it keeps its state (W, S: 4 x 8K floats at D = 64, expansion
   2) and the chunk's activations in L1/L2 for the whole chain, so the chain costs its arithmetic
   instead of ~30 framework ops per chunk forward and ~60 backward. Forward stores each chunk's
   starting W and S (the backward needs W for the second-order terms and both for the scalar
   coefficients' gradients); backward walks the chunks in reverse and recomputes the chunk's
   activations from them.

   Every matrix product is `gemm` below: C = beta C + alpha A B with B and C row-major and A read
   through (row, column) strides, so A^T costs nothing; products with a transposed B transpose it
   into scratch first (a few thousand floats, cheap beside the product).

   Layouts: q, k [B][T][H][D_0], v [B][T][H][D_L] and theta, eta, alpha [B][T][H] are read in the
   caller's layout through (batch, time, head) strides, the last dim contiguous; each chunk's
   coefficients (a = c_M0, b_M = c_S0_M, b_S = c_S0_S, c_M, c_S) are computed from its gates in
   log space as in chunk.py's `chunk_coefficients`, and differentiated by hand in backward. A
   ragged last chunk is a shorter chunk. Optional: queries qr [B][Tr][H][D_0] read from the final
   memory (MAC's retrieval for the next segment). Outputs o, or [B][T|Tr][H][D_L] contiguous; per
   layer l with widths wid[0..L]: W0[l] [H] or [B][H] x [wid[l]][wid[l+1]], S0[l] (NULL: zero
   momentum), Wout[l], Sout[l] [B*H][...], Wst[l], Sst[l] [B*H][N][...] (the chunk-start states).
   act: 0 silu, 1 gelu (exact, erf). chunk_memory_impl.h documents each entry point.
   Axis glossary: B batch, H heads, T time, N chunks, b chunk size, L memory layers. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp2.h"

/* Non-temporal (cache-bypassing) stores of one 64-byte vector at a 64-byte aligned address, and
   the fence that orders them before the caller reads the memory; plain stores elsewhere. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define NT_STORE_f32(p, v) _mm512_stream_ps((p), (__m512)(v))
#define NT_STORE_f64(p, v) _mm512_stream_pd((p), (__m512d)(v))
#elif defined(__AVX__)
#include <immintrin.h>
#define NT_STORE_HALVES(p, v, T, store)                                                              \
    do {                                                                                          \
        T lo_, hi_;                                                                               \
        memcpy(&lo_, &(v), 32);                                                                   \
        memcpy(&hi_, (const char *)&(v) + 32, 32);                                                \
        store((p), lo_);                                                                          \
        store((p) + 32 / sizeof(*(p)), hi_);                                                      \
    } while (0)
#define NT_STORE_f32(p, v) NT_STORE_HALVES(p, v, __m256, _mm256_stream_ps)
#define NT_STORE_f64(p, v) NT_STORE_HALVES(p, v, __m256d, _mm256_stream_pd)
#endif
#if defined(__x86_64__) || defined(__i386__)
#define STORE_FENCE() __builtin_ia32_sfence()
#else
#define STORE_FENCE() ((void)0)
#endif

#define S float
#define SUF(name) name##_f32
#define EXP(x) exp2_f32((x) * (float)LOG2E)
#define ERF erff
#include "small_matrix_impl.h"
#include "chunk_memory_impl.h"
#undef S
#undef SUF
#undef EXP
#undef ERF

#define S double
#define SUF(name) name##_f64
#define EXP(x) exp(x)
#define ERF erf
#include "small_matrix_impl.h"
#include "chunk_memory_impl.h"
