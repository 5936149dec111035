"""Sequential references for the Mamba mixers: a loop over time, readable, in the input dtype.

- `naive_selective_scan`: Mamba-1's selective SSM (Gu & Dao 2023, arXiv 2312.00752, Alg. 2) with
  zero-order-hold on A and Euler on B, as in the official kernel and Jamba (arXiv 2403.19887):
      Ā_t = exp(Δ_t A),   h_t = Ā_t ⊙ h_{t-1} + (Δ_t u_t) B_t,   y_t = (h_t C_t + D u_t) silu(z_t).
- `naive_ssd`: Mamba-2's SSD recurrence (Dao & Gu 2024, arXiv 2405.21060) with a scalar decay
  per head: h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ,  y_t = h_t C_t + D x_t.

These are the ground truth for `chunk.py`; they are slow (Python loop over T) on purpose.

Axis glossary: B batch, T time, D inner channels (Mamba-1), N state size, H heads, P head dim,
G groups of B/C (Mamba-2, H % G == 0).
"""

from __future__ import annotations

import torch


def naive_selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         C: torch.Tensor, D: torch.Tensor | None = None,
                         initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False, z: torch.Tensor | None = None):
    """u, delta [B, T, D] (delta already softplus'ed), A [D, N], B, C [B, T, N], D [D], z [B, T, D]
    (the gate), initial_state [B, D, N] -> y [B, T, D], final_state [B, D, N] (or None)."""
    Bsz, T, Dn = u.shape
    h = u.new_zeros(Bsz, Dn, A.shape[-1]) if initial_state is None else initial_state.to(u.dtype)
    ys = []
    for t in range(T):
        dA = torch.exp(delta[:, t, :, None] * A)  # [B, D, N]
        dBu = (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]  # [B, D, N]
        h = dA * h + dBu
        ys.append((h * C[:, t, None, :]).sum(-1))  # [B, D]
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y, (h if output_final_state else None)


def naive_ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
              output_final_state: bool = False):
    """x [B, T, H, P], dt [B, T, H] (already softplus'ed), A [H], B, C [B, T, G, N], D [H],
    initial_state [B, H, P, N] -> y [B, T, H, P], final_state [B, H, P, N] (or None)."""
    Bsz, T, H, P = x.shape
    rep = H // B.shape[2]
    B, C = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)  # [B, T, H, N]
    h = x.new_zeros(Bsz, H, P, B.shape[-1]) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # [B, H, 1, 1]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * D[:, None]
    return y, (h if output_final_state else None)
