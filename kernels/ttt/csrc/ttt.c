/* TTT-Linear and TTT-MLP dual forms, forward and backward, fused for CPU (plain C99 + OpenMP).

   Built and loaded by kernels/native.py, called through ctypes by ../fused_cpu.py. The math is
   that of ../chunk.py (`_linear_step`) and ../README.md; per mini-batch of K <= b tokens, with
   the weights W [D][D], bias c [D] from the end of the previous mini-batch and
   E[i][j] = tok[i] eta_j (j <= i):

       Z = K W + c,  G = d/dZ 1/2 ||LN(Z) - (V - K)||^2          (LayerNorm + L2 backward)
       A = tril(E * (Q K^T + 1)),  Zbar = Q W + c - A G,  z = Q + LN(Zbar)
       W' = W - (e K)^T G,  c' = c - sum_j e_j G_j,              e_j = tok[K-1] eta_j

   A task is one (batch, head) row: it keeps W and c in cache for the whole sequence and runs
   every product through the register-blocked loops of ../../csrc/small_matrix_impl.h, instead of
   ~25 framework ops per mini-batch forward and ~60 backward. Forward stores each mini-batch's
   starting W and c; backward walks the mini-batches in reverse, recomputes the mini-batch's
   activations from them and carries dW, dc (README.md derives each term). A ragged last
   mini-batch is a shorter one using tok[:K].

   TTT-MLP (ttt_mlp_impl.h) runs the same chain on both layers: with X2 = gelu_tanh(K W1 + b1),
   Z2 = X2 W2 + b2, G2 the LN-L2 backward at Z2 and G1 = (G2 W2^T) gelu'(Z1),

       Z1b = Q W1 + b1 - A G1,  X2b = gelu(Z1b),  Zbar = X2b W2 + b2 - tril(E * (X2b X2^T + 1)) G2
       W1' = W1 - (e K)^T G1, b1' = b1 - sum_j e_j G1_j, W2' = W2 - (e X2)^T G2, b2' = ...

   and its backward adds the second-order path through G1 (gelu''). Its states are 4 pointers
   (W1 [D][F], b1 [F], W2 [F][D], b2 [D] per task) and it saves all four per mini-batch.

   Layouts: q, k, v [B][T][H][D] and eta [B][T][H] read through (batch, time, head) strides with
   the last dim contiguous; tok [b]; gamma, beta [H][D]; states per task (B*H of them, batch-major):
   W0, Wout [BH][D][D], c0, cout [BH][D], Wst [BH][N][D][D], cst [BH][N][D]; z, dz, dq, dk, dv
   [B][T][H][D] and deta [B][T][H] contiguous; per-task partial gradients dtok [BH][b],
   dgamma, dbeta [BH][D] (the caller sums them). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp2.h"

#define S float
#define SUF(name) name##_f32
/* tanh u = 2 sigmoid(2u) - 1 through exp2.h's vectorisable exp2 (absolute error ~1e-7, which
   is what gelu's 0.5 x (1 + tanh) needs) */
#define TANH(u) ((float)2 * sigmoid_f32((float)2 * (u)) - (float)1)
#include "small_matrix_impl.h"
#include "ttt_linear_impl.h"
#include "ttt_mlp_impl.h"
#undef S
#undef SUF
#undef TANH

#define S double
#define SUF(name) name##_f64
#define TANH tanh
#include "small_matrix_impl.h"
#include "ttt_linear_impl.h"
#include "ttt_mlp_impl.h"
