"""Mamba mixers: Jamba's Mamba-1 layer and a Mamba-2 (SSD) layer, as plain PyTorch modules.

`MambaMixer` follows Mamba-1 (Gu & Dao 2023, arXiv 2312.00752) as used in Jamba (arXiv
2403.19887): in-projection to 2·D_inner (x and the gate z), depthwise causal conv (width 4),
SiLU, data-dependent Δ/B/C from one projection, RMSNorm on Δ (before its up-projection), B and C
(Jamba's addition for stability at scale), Δ = softplus(W_Δ Δ + b_Δ), A = -exp(A_log), D skip,
output gated by SiLU(z). Parameter names follow Hugging Face `JambaMambaMixer` so weights map
one to one (`models/jamba/hf.py`).

`Mamba2Mixer` follows Mamba-2 (Dao & Gu 2024, arXiv 2405.21060): one in-projection to
(z, x, B, C, Δ), causal conv over (x, B, C), scalar A per head, chunked SSD, gated RMSNorm,
out-projection. Deliberate simplification: no B/C/Δ norms, `n_groups` B/C groups shared by heads.

Both take `initial_state` and return `final_state` (conv window and SSM state), so a sequence can
be processed in pieces (context parallelism, generation); scans run in float32 (float64 for
float64 inputs) whatever the autocast dtype.

Axis glossary: B batch, T time, C model width, D inner width (expand·C), N state size, K conv
width, R Δ rank, H heads, P head dim, G groups.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from titanforge.kernels.mamba import causal_conv1d_silu, chunk_selective_scan, chunk_ssd
from titanforge.kernels.pointwise import swiglu
from titanforge.models.common.layers import RMSNorm


class MambaState(NamedTuple):
    conv: torch.Tensor  # [B, channels, K-1] last conv inputs
    ssm: torch.Tensor  # [B, D, N] (Mamba-1) or [B, H, P, N] (Mamba-2)


def _scan_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def init_dt_bias(bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """Mamba's Δ bias init: softplus(bias) log-uniform in [dt_min, dt_max] (inverse softplus)."""
    with torch.no_grad():
        dt = torch.exp(torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(1e-4)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class MambaMixer(nn.Module):
    """Jamba's Mamba-1 layer: [B, T, C] -> [B, T, C]."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int = 0,
                 *, norm_eps: float = 1e-6, init_std: float = 0.02, chunk_size: int = 0,
                 conv_bias: bool = True, proj_bias: bool = False):
        super().__init__()
        if min(d_state, d_conv, expand) < 1:
            raise ValueError(f"Mamba needs d_state, d_conv, expand >= 1, got {d_state}, {d_conv}, {expand}")
        inner = expand * dim
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.d_state, self.chunk_size, self.init_std = d_state, chunk_size, init_std
        self.in_proj = nn.Linear(dim, 2 * inner, bias=proj_bias)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, bias=conv_bias, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, d_state))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, dim, bias=proj_bias)
        self.dt_layernorm = RMSNorm(self.dt_rank, norm_eps)
        self.b_layernorm = RMSNorm(d_state, norm_eps)
        self.c_layernorm = RMSNorm(d_state, norm_eps)

    def forward(self, x: torch.Tensor, initial_state: MambaState | None = None,
                output_final_state: bool = False):
        """x [B, T, C] -> y [B, T, C], or (y, MambaState) with `output_final_state`."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, D] each
        xs, conv_state = causal_conv1d_silu(xs, self.conv1d.weight, self.conv1d.bias,
                                            None if initial_state is None else initial_state.conv)
        dt, Bm, Cm = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, Bm, Cm = self.dt_layernorm(dt), self.b_layernorm(Bm), self.c_layernorm(Cm)
        sd = _scan_dtype(x.dtype)
        delta = F.softplus(self.dt_proj(dt).to(sd))  # [B, T, D]
        A = -torch.exp(self.A_log.to(sd))  # [D, N]
        y, ssm_state = chunk_selective_scan(
            xs.to(sd), delta, A, Bm.to(sd), Cm.to(sd), self.D.to(sd),
            initial_state=None if initial_state is None else initial_state.ssm,
            output_final_state=output_final_state, chunk_size=self.chunk_size, z=z.to(sd))  # y * silu(z)
        out = self.out_proj(y.to(x.dtype))
        return (out, MambaState(conv_state, ssm_state)) if output_final_state else out

    def init_weights(self, out_std: float | None = None) -> None:
        nn.init.trunc_normal_(self.in_proj.weight, std=self.init_std)
        nn.init.trunc_normal_(self.x_proj.weight, std=self.init_std)
        nn.init.trunc_normal_(self.out_proj.weight, std=out_std or self.init_std)
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.conv1d.reset_parameters()
        # Mamba's Δ init: W_Δ ~ U(±R^-1/2), softplus(b_Δ) ~ LogUniform[1e-3, 0.1].
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        init_dt_bias(self.dt_proj.bias)
        with torch.no_grad():
            # S4D-real: A_n = -(n + 1). Built from the parameter itself (cumsum of ones along the
            # state axis) so it also fills a sharded (DTensor) parameter in place.
            self.A_log.copy_(torch.ones_like(self.A_log).cumsum(-1).log())
            self.D.fill_(1.0)
        for norm in (self.dt_layernorm, self.b_layernorm, self.c_layernorm):
            norm.init_weights()

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6x the projections' weights plus ~9 ops per (d, n) scan entry x 3."""
        inner, N = self.D.shape[0], self.d_state
        proj = sum(m.weight.numel() for m in (self.in_proj, self.x_proj, self.dt_proj, self.out_proj))
        return 6.0 * proj + 3.0 * 9 * inner * N + 6.0 * self.conv1d.weight.numel()


class GatedRMSNorm(RMSNorm):
    """Mamba-2's output norm: RMSNorm(y * silu(z))."""

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(swiglu(z, y))  # y * silu(z), one fused pass on CPU


class Mamba2Mixer(nn.Module):
    """Mamba-2 (SSD) layer: [B, T, C] -> [B, T, C]."""

    def __init__(self, dim: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, headdim: int = 32,
                 n_groups: int = 1, *, norm_eps: float = 1e-6, init_std: float = 0.02, chunk_size: int = 64):
        super().__init__()
        inner = expand * dim
        if inner % headdim:
            raise ValueError(f"Mamba-2 inner width expand*dim={inner} is not divisible by headdim={headdim}; "
                             f"pick a headdim among {[d for d in range(1, inner + 1) if inner % d == 0][-6:]}")
        n_heads = inner // headdim
        if n_heads % n_groups:
            raise ValueError(f"Mamba-2 heads {n_heads} are not divisible by n_groups={n_groups}")
        self.inner, self.d_state, self.headdim, self.n_groups = inner, d_state, headdim, n_groups
        self.chunk_size, self.init_std = chunk_size, init_std
        conv_dim = inner + 2 * n_groups * d_state
        self.in_proj = nn.Linear(dim, inner + conv_dim + n_heads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = GatedRMSNorm(inner, norm_eps)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, initial_state: MambaState | None = None,
                output_final_state: bool = False):
        """x [B, T, C] -> y [B, T, C], or (y, MambaState) with `output_final_state`."""
        Bsz, T, _ = x.shape
        H, GN = self.A_log.shape[0], self.n_groups * self.d_state
        inner = self.norm.weight.shape[0]
        z, xbc, dt = self.in_proj(x).split([inner, inner + 2 * GN, H], dim=-1)
        xbc, conv_state = causal_conv1d_silu(xbc, self.conv1d.weight, self.conv1d.bias,
                                             None if initial_state is None else initial_state.conv)
        xs, Bm, Cm = xbc.split([inner, GN, GN], dim=-1)
        sd = _scan_dtype(x.dtype)
        y, ssm_state = chunk_ssd(
            xs.to(sd).reshape(Bsz, T, H, -1), F.softplus((dt + self.dt_bias).to(sd)),
            -torch.exp(self.A_log.to(sd)), Bm.to(sd).reshape(Bsz, T, self.n_groups, -1),
            Cm.to(sd).reshape(Bsz, T, self.n_groups, -1), self.D.to(sd),
            initial_state=None if initial_state is None else initial_state.ssm,
            output_final_state=output_final_state, chunk_size=self.chunk_size)
        out = self.out_proj(self.norm(y.reshape(Bsz, T, inner), z.to(sd)).to(x.dtype))
        return (out, MambaState(conv_state, ssm_state)) if output_final_state else out

    def init_weights(self, out_std: float | None = None) -> None:
        nn.init.trunc_normal_(self.in_proj.weight, std=self.init_std)
        nn.init.trunc_normal_(self.out_proj.weight, std=out_std or self.init_std)
        self.conv1d.reset_parameters()
        init_dt_bias(self.dt_bias)
        with torch.no_grad():
            # Mamba-2 samples A uniformly in [1, 16].
            self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1, 16)))
            self.D.fill_(1.0)
        self.norm.init_weights()

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6x the projections plus the SSD's state products (~3 x 4 P N per head)."""
        H = self.A_log.shape[0]
        proj = self.in_proj.weight.numel() + self.out_proj.weight.numel()
        return 6.0 * proj + 3.0 * 4 * H * self.headdim * self.d_state + 6.0 * self.conv1d.weight.numel()
