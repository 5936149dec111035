"""Attention of the Titans variants: persistent memory, sliding windows and MAC segment masks.

Persistent memory (Eq. 19): N_p learnable, input-independent tokens, here prepended to the keys
and values of every attention layer and visible to every query. They carry no rotary position
(they are not at any position); sequence tokens use RoPE. Each mask is one `mask_mod(q_idx,
kv_idx)` written once in torch ops and used two ways: through FlexAttention on GPU, and as an
exact boolean [Tq, Tkv] mask through SDPA (models.common.attention) elsewhere. In torch 2.13,
flex_attention has no backward on CPU (eager or compiled: "FlexAttention does not support
backward on CPU"), so the boolean fallback is what runs on CPU.

Axis glossary: B batch, T time, C width, H heads, D head dim, P persistent tokens, L segment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titanforge.models.common import apply_rope, attention

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # older torch: the boolean fallback serves every device
    create_block_mask = flex_attention = None


def sliding_window_mask_mod(n_persistent: int, window: int):
    """Keys [P | x]; query i sees all P and x_j with i - window < j <= i."""
    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx - n_persistent
        return (kv_idx < n_persistent) | ((j <= q_idx) & (q_idx - j < window))
    return mask_mod


def mac_mask_mod(n_persistent: int, seg_len: int):
    """Keys [P | h | S] for a segment of seg_len tokens; query i sees all P, h_j and S_j for j <= i.
    h_j = M*(q_j) is read from token j's query, so it is as causal as S_j itself."""
    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx - n_persistent
        j = torch.where(j >= seg_len, j - seg_len, j)
        return (kv_idx < n_persistent) | (j <= q_idx)
    return mask_mod


def dense_mask(mask_mod, q_len: int, kv_len: int, device) -> torch.Tensor:
    q_idx = torch.arange(q_len, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    return mask_mod(None, None, q_idx, kv_idx)


def masked_attention(q, k, v, mask_mod, *, use_flex: bool | None = None, dense: torch.Tensor | None = None):
    """q [B, Tq, H, D], k/v [B, Tkv, H, D] under mask_mod -> [B, Tq, H, D].
    FlexAttention on CUDA (use_flex=None), the exact boolean-mask SDPA path otherwise; `dense` is
    mask_mod's boolean [Tq, Tkv] mask when the caller has it already (a loop over equal segments)."""
    Tq, Tkv = q.shape[1], k.shape[1]
    if use_flex is None:
        use_flex = flex_attention is not None and q.is_cuda
    if use_flex:
        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=Tq, KV_LEN=Tkv, device=q.device)
        out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)
    return attention(q, k, v, attn_mask=dense_mask(mask_mod, Tq, Tkv, q.device) if dense is None else dense)


class PersistentAttention(nn.Module):
    """Multi-head attention whose keys/values are [persistent tokens | context].

    forward(x [B, Tq, C], context [B, Tkv, C] (default x), mask_mod, freqs_q, freqs_kv) -> [B, Tq, C].
    """

    def __init__(self, dim: int, n_heads: int, n_persistent: int, init_std: float = 0.02):
        super().__init__()
        self.head_dim = dim // n_heads
        self.init_std = init_std
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.wo = nn.Linear(dim, dim, bias=False)
        self.persistent = nn.Parameter(torch.empty(n_persistent, dim))
        # Keys and values of x as one matmul (`kv_weight`); tensor parallelism turns it off, as in
        # NeuralMemory.fuse_projections.
        self.fuse_projections = True

    def init_weights(self, out_std: float | None = None) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, std=self.init_std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std or self.init_std)
        nn.init.normal_(self.persistent, std=self.init_std)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:2], -1, self.head_dim)

    def kv_weight(self, through: torch.Tensor | None = None):
        """[wk; wv] for `project_kv`, concatenated once per forward (MAC projects every segment's
        retrieved tokens); None when `fuse_projections` is off. `through` (a [C, C_in] weight the
        input would pass first) is folded in: [wk; wv] @ through projects that linear's input."""
        if not self.fuse_projections:
            return None
        weight = torch.cat([self.wk.weight, self.wv.weight])
        return weight if through is None else weight @ through

    def project_kv(self, x: torch.Tensor, freqs: torch.Tensor, kv_weight: torch.Tensor | None = None):
        """Keys (with RoPE) and values of x [B, T, C] -> two [B, T, H, D]; one matmul with `kv_weight`."""
        if kv_weight is None:
            return apply_rope(self._heads(self.wk(x)), freqs), self._heads(self.wv(x))
        k, v = F.linear(x, kv_weight).chunk(2, -1)
        return apply_rope(self._heads(k), freqs), self._heads(v)

    def project_q(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        return apply_rope(self._heads(self.wq(x)), freqs)

    def persistent_kv(self, B: int):
        """Keys and values of the persistent tokens, [B, P, H, D] each (no RoPE), or None if P = 0."""
        P = self.persistent.shape[0]
        if not P:
            return None
        return (self._heads(self.wk(self.persistent).expand(B, P, -1)),
                self._heads(self.wv(self.persistent).expand(B, P, -1)))

    def attend(self, q, k, v, mask_mod, persistent=None, dense=None):
        """Projected q [B, Tq, H, D] over [persistent | k, v] under mask_mod -> [B, Tq, C]
        (`dense`: mask_mod's boolean mask, if the caller has it)."""
        if persistent is not None:
            k, v = torch.cat([persistent[0], k], 1), torch.cat([persistent[1], v], 1)
        return self.wo(masked_attention(q, k, v, mask_mod, dense=dense).flatten(2))

    def forward(self, x, mask_mod, freqs_q, context=None, freqs_kv=None):
        context = x if context is None else context
        freqs_kv = freqs_q if freqs_kv is None else freqs_kv
        k, v = self.project_kv(context, freqs_kv)
        return self.attend(self.project_q(x, freqs_q), k, v, mask_mod, self.persistent_kv(x.shape[0]))
