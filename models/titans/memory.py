"""The Titans neural long-term memory as a layer (Behrouz et al. 2025, Sec. 3.1 and 4.4).

x -> q, k, v by linear projections, each followed by a depthwise causal 1-D convolution and SiLU;
q and k l2-normalised. Per-token, per-head gates theta (step), eta (momentum decay), alpha
(forgetting) are linear functions of x through a sigmoid. The memory itself is a per-head MLP
with learnable initial weights, updated by `chunk_titans_memory` (kernels/titans_memory) and read
with y = M*(q). The read passes through a per-head RMSNorm and a learned gate sigmoid(x W_g)
before the output projection (Sec. 4.4, "normalization and a linear gate").

Choices where the paper is silent:
- theta = theta_max * sigmoid(.) (theta_max = 0.1) with bias -2 at init (theta ~ 0.012); eta bias
  0 (eta ~ 0.5), alpha bias -4 (alpha ~ 0.02). A chunk sums b gradients taken at one point and
  momentum multiplies the step by ~1/(1 - eta); with theta = 0.12, eta = 0.88, b = 16 the memory
  of a 2-layer model diverged within 100 tokens, so the initial effective step is kept < 1/b.
- Memory weights init with std 1/sqrt(d_in) (variance-preserving), shared over the batch.
- `gate_granularity` > 1 pools the gate logits over blocks of that many tokens (titans-pytorch
  pools per chunk); the paper's per-token gates are the default.

Axis glossary: B batch, T time, C model width, H heads, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from titanforge.kernels.mamba.conv import causal_conv1d_silu
from titanforge.kernels.norms import l2_normalize
from titanforge.kernels.titans_memory import chunk_titans_memory, titans_memory_inputs, titans_memory_retrieve
from titanforge.models.common import RMSNorm
from titanforge.models.titans.config import TitansConfig


class ShortConv(nn.Module):
    """Depthwise causal 1-D convolution over time; `cache` (the last K-1 inputs) continues a stream."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        B, T, C = x.shape
        pad = cache if cache is not None else x.new_zeros(B, self.kernel - 1, C)
        xp = torch.cat([pad, x], dim=1)  # [B, K-1+T, C]
        # K shifted multiply-adds rather than F.conv1d: on CPU the depthwise conv's backward
        # (mkldnn) cost ~4 ms per call at [2, 64, 256], the shifted form ~0.1 ms.
        w = self.weight[:, 0]  # [C, K]
        y = xp[:, :T] * w[:, 0]
        for j in range(1, self.kernel):
            y = torch.addcmul(y, xp[:, j:j + T], w[:, j])
        return y, xp[:, xp.shape[1] - (self.kernel - 1):]

    def forward_silu(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        """silu(forward(x, cache)) through the fused conv + SiLU of kernels/mamba/conv.py (a C loop on CPU)."""
        return conv_silu(x, self.weight, cache)

    def init_weights(self) -> None:
        # Start near identity (last tap 1) so the projections pass through at init.
        with torch.no_grad():
            nn.init.normal_(self.weight, std=0.02)
            self.weight[:, :, -1] += 1.0


def conv_silu(x: torch.Tensor, weight: torch.Tensor, cache: torch.Tensor | None):
    """silu(depthwise causal conv(x)) for x [B, T, C], weight [C, 1, K] and a ShortConv cache [B, K-1, C]."""
    y, state = causal_conv1d_silu(x, weight, None, None if cache is None else cache.transpose(1, 2))
    return y, state.transpose(1, 2)


class MemoryWeights(nn.ParameterList):
    """The memory MLP's initial weights, [H, d_in, d_out] per layer. A module call (rather than
    reading the list) so tensor parallelism can hand the memory op this rank's heads."""

    # ParameterList forbids calls; this one is a module whose forward returns its weights.
    __call__ = nn.Module.__call__

    def forward(self) -> list[torch.Tensor]:
        return list(self)


class NeuralMemory(nn.Module):
    """Long-term memory mixer: forward(x [B, T, C], state) -> (out [B, T, C], state)."""

    def __init__(self, dim: int, n_heads: int, cfg: TitansConfig, init_std: float = 0.02):
        super().__init__()
        self.cfg, self.init_std = cfg, init_std
        H, D = n_heads, dim // n_heads
        self.head_dim = D
        self.wq, self.wk, self.wv = (nn.Linear(dim, H * D, bias=False) for _ in range(3))
        self.conv_q, self.conv_k, self.conv_v = (ShortConv(H * D, cfg.conv_kernel) for _ in range(3))
        # One linear per gate (not one fused [3H] output) so tensor parallel can shard heads.
        self.w_theta, self.w_eta, self.w_alpha = (nn.Linear(dim, H) for _ in range(3))
        widths = [D] + [D * cfg.memory_expansion] * (cfg.memory_depth - 1) + [D]
        self.memory = MemoryWeights([nn.Parameter(torch.empty(H, i, o)) for i, o in zip(widths[:-1], widths[1:])])
        self.out_norm = RMSNorm(D)
        self.w_gate = nn.Linear(dim, H * D, bias=False)
        self.wo = nn.Linear(H * D, dim, bias=False)
        # Run the update's projections as one matmul and its convolutions as one fused conv + SiLU
        # (`project`). Tensor parallelism turns this off: there each projection is its own
        # column-parallel linear and each conv a local-shard region (parallel/tensor_parallel.py).
        self.fuse_projections = True

    def init_weights(self, out_std: float | None = None) -> None:
        for lin in (self.wq, self.wk, self.wv, self.w_gate):
            nn.init.trunc_normal_(lin.weight, std=self.init_std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std or self.init_std)
        for conv in (self.conv_q, self.conv_k, self.conv_v):
            conv.init_weights()
        for lin, bias in ((self.w_theta, -2.0), (self.w_eta, 0.0), (self.w_alpha, -4.0)):
            nn.init.trunc_normal_(lin.weight, std=self.init_std)
            nn.init.constant_(lin.bias, bias)
        for w in self.memory:
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))
        self.out_norm.init_weights()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], -1, self.head_dim)

    def query(self, x: torch.Tensor, cache: torch.Tensor | None = None, projected: torch.Tensor | None = None):
        """q [B, T, H, D] (projection, conv, SiLU, l2-norm) and the conv cache; `projected` is x W_q
        when the caller computed it (fused with other projections of x)."""
        if self.fuse_projections:
            q, cache = self.conv_q.forward_silu(self.wq(x) if projected is None else projected, cache)
        else:  # through the conv module's own call (tensor parallelism swaps in its shard there)
            q, cache = self.conv_q(self.wq(x), cache)
            q = F.silu(q)
        return l2_normalize(self._heads(q)), cache

    def keys_values(self, x: torch.Tensor, caches=(None, None)):
        k, ck = self.conv_k(self.wk(x), caches[0])
        v, cv = self.conv_v(self.wv(x), caches[1])
        return l2_normalize(self._heads(F.silu(k))), self._heads(F.silu(v)), (ck, cv)

    def gates(self, x: torch.Tensor):
        """theta, eta, alpha [B, T, H], per token (or pooled over gate_granularity tokens)."""
        return self._gates([lin(x) for lin in (self.w_theta, self.w_eta, self.w_alpha)])

    def update_projection(self):
        """The weights of `project`, concatenated once per forward (not per MAC segment); None when
        `fuse_projections` is off."""
        if not self.fuse_projections:
            return None
        lins = (self.wq, self.wk, self.wv, self.w_theta, self.w_eta, self.w_alpha)
        weight = torch.cat([lin.weight for lin in lins])
        gate_bias = torch.cat([self.w_theta.bias, self.w_eta.bias, self.w_alpha.bias])  # [3H]: only the gates have one
        conv = torch.cat([c.weight for c in (self.conv_q, self.conv_k, self.conv_v)])
        return weight, gate_bias, conv

    def project(self, x: torch.Tensor, cache=None, fused=None):
        """Everything a memory update reads from x: (q, k, v [B, T, H, D], gates, conv cache), equal
        to query + keys_values + gates. `fused` (from update_projection) runs the six projections as
        one matmul and the three convolutions as one fused conv + SiLU (a C loop on CPU)."""
        if fused is None:
            caches = cache or (None, None, None)
            q, cq = self.query(x, caches[0])
            k, v, (ck, cv) = self.keys_values(x, caches[1:])
            return q, k, v, self.gates(x), (cq, ck, cv)
        weight, gate_bias, conv = fused
        C = self.wq.out_features
        H = C // self.head_dim
        if self.cfg.gate_granularity == 1:
            # conv + SiLU, the q/k norms and the gates (their bias added inside) in one op, one C
            # loop each way on CPU; the projection is a plain matmul
            q, k, v, gates, cache = titans_memory_inputs(F.linear(x, weight), conv, cache, H, self.cfg.theta_max,
                                                         gate_bias=gate_bias)
            return q, k, v, gates, cache
        # split, not slicing: one backward concatenation instead of a zero-filled gradient per slice
        qkv, logits = F.linear(x, weight).split([3 * C, 3 * H], -1)
        logits = logits + gate_bias
        qkv, cache = conv_silu(qkv, conv, cache)
        qk, v = self._heads(qkv).split([2 * H, H], 2)  # [B, T, 3H, D]: q, k, v heads
        q, k = l2_normalize(qk).split(H, 2)
        return q, k, v, self._gates(logits.split(H, -1)), cache

    def _gates(self, logits):
        g = self.cfg.gate_granularity
        if g > 1:
            T = logits[0].shape[1]
            pad = (-T) % g
            # Blocks of g tokens start at multiples of g, which divide the chunk grid: pooling
            # never crosses a chunk boundary, so no token's state sees a later chunk.
            # The last block may be short: divide by its real token count, not g.
            count = torch.full((T + pad,), float(g), device=logits[0].device)
            count[T - T % g if T % g else T:] = float(T % g or g)
            count = count.unflatten(0, (-1, g))[:, :1, None]  # [n, 1, 1]
            logits = [(F.pad(z, (0, 0, 0, pad)).unflatten(1, (-1, g)).sum(2, keepdim=True) / count)
                      .expand(-1, -1, g, -1).flatten(1, 2)[:, :T] for z in logits]
        theta = self.cfg.theta_max * torch.sigmoid(logits[0])
        return theta, torch.sigmoid(logits[1]), torch.sigmoid(logits[2])

    def out_gate(self, x: torch.Tensor, projected: torch.Tensor | None = None) -> torch.Tensor:
        """The learned read gate sigmoid(x W_g), [B, T, H, D] (`projected`: x W_g, if computed)."""
        return torch.sigmoid(self._heads(self.w_gate(x) if projected is None else projected))

    def read_gated(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Norm and gate of the read, before the output projection: y [B, T, H, D] -> [B, T, H*D]."""
        # Through the module (not rms_norm on its weight): parallel styles hook the module call.
        return self.out_norm(y, gate).flatten(2)

    def read_out(self, y: torch.Tensor, x: torch.Tensor | None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Norm, learned gate sigmoid(x W_g) (or a precomputed `gate`), output projection:
        y [B, T, H, D] -> [B, T, C]."""
        return self.wo(self.read_gated(y, self.out_gate(x) if gate is None else gate))

    def initial_state(self):
        return self.memory(), None

    def retrieve(self, q: torch.Tensor, state) -> torch.Tensor:
        return titans_memory_retrieve(q, state[0], self.cfg.memory_activation)

    def update(self, q, k, v, gates, state, read_after=None):
        """Run the memory op over a piece of sequence from `state`: (raw reads [B, T, H, D], state),
        and with `read_after` (queries) also the final memory's read of them, M_final(read_after)."""
        weights, momentum = state
        return chunk_titans_memory(q, k, v, *gates, weights=weights, momentum=momentum,
                                   chunk_size=self.cfg.chunk_size, activation=self.cfg.memory_activation,
                                   compile=self.cfg.compile_memory, read_after=read_after,
                                   inner_grad_clip=self.cfg.inner_grad_clip)

    def forward(self, x: torch.Tensor, state=None):
        q, k, v, gates, _ = self.project(x, fused=self.update_projection())
        o, state = self.update(q, k, v, gates, state or self.initial_state())
        return self.read_out(o, x), state

    def flops_per_token(self) -> float:
        """Inner-loop matmul FLOPs per token, forward: reads of q and k, backprop, two weighted grad sums."""
        H = self.memory[0].shape[0]
        per_layer = sum(w.shape[1] * w.shape[2] for w in self.memory)
        return 2.0 * H * per_layer * 5
