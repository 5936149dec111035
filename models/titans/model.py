"""Titans language models (Behrouz, Zhong, Mirrokni, arXiv 2501.00663): MAC, MAG, MAL and LMM.

Pre-norm residual blocks, each ending in a SwiGLU feed-forward; `model.titans.variant` picks the
sequence mixer:
- MAC (Sec. 4.1, Eq. 21-25): the sequence is cut into segments of `segment_len`. For segment S:
  h = M*_{prev}(q_S) is read from the memory; attention over [persistent | h | S] (causal, see
  attention.mac_mask_mod) gives y; the memory is updated with y; o = y * sigmoid(M*(y)).
- MAG (Sec. 4.2): x~ = [p || x]; sliding-window attention over x~ (the persistent tokens p are its
  key/value prefix) and the memory over x~ (its outputs at x's positions), each normalised with a
  learnable vector-valued weight, combined by the non-linear gate and projected:
  o = W_g (norm_a(y_attn) * sigmoid(norm_m(M(x~)))).
- MAL (Sec. 4.3): x~ = [p || x]; a memory layer over x~, then sliding-window attention, each a
  residual branch.
- LMM: the memory alone as the sequence mixer.

Deliberate differences from the paper, and choices where it is silent:
- MAC reads the updated memory causally: o_t reads the weights at the start of t's memory chunk
  (which include every earlier chunk, this segment's too). Reading M_t after the whole segment,
  as Eq. 25 is written, would leak later tokens of the segment into earlier outputs.
- MAC's non-linear gate "(x)" is y * sigmoid(memory branch), the memory branch already normalised
  and gated (memory.py). MAG's gate ends in a projection W_g (depth-scaled init, like every residual
  branch's last linear): the normalised product has unit scale, which the paper leaves to the
  model's later layers; Sec. 4.4's "normalization and gating ... before the output projection".
- Persistent tokens are per layer (attention.py), the same p for both branches. The memory is
  causal and p comes first, so in MAL the memory's outputs at p's positions are input-independent
  (a function of p and the initial memory alone): attention uses p itself as its key/value prefix,
  a reparametrisation of the paper's M(x~)[:N_p]. p enters the memory unnormalised (learnable).
- h and S share segment-local RoPE positions; persistent tokens have none.
- Defaults (config.py): L_M = 2, expansion 2, b = 16, segment = window = 64, N_p = 4: small enough
  for CPU, with b dividing the segment so memory chunks line up across segments.

Axis glossary: B batch, T time, C model width, H heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titanforge.models.common import RMSNorm, SwiGLU, apply_rope, depth_scaled_std
from titanforge.models.common.lm import CausalLM
from titanforge.models.config import ModelConfig
from titanforge.models.titans.attention import PersistentAttention, dense_mask, mac_mask_mod, sliding_window_mask_mod
from titanforge.models.titans.memory import NeuralMemory


class TitansBlock(nn.Module):
    """One block: the variant's mixer, then SwiGLU. forward(x [B, T, C], freqs) -> [B, T, C]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.titans
        self.variant, self.tcfg = t.variant, t
        self.out_std = depth_scaled_std(cfg.init_std, cfg.n_layers)
        self.memory_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.memory = NeuralMemory(cfg.d_model, cfg.n_heads, t, cfg.init_std)
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if t.variant == "mal" else None
        self.attention = (PersistentAttention(cfg.d_model, cfg.n_heads, t.n_persistent, cfg.init_std)
                          if t.variant != "lmm" else None)
        if t.variant == "mag":  # Sec. 4.2: both branches normalised before the gate
            self.gate_norm_attention = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.gate_norm_memory = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_dim, init_std=cfg.init_std)

    def init_weights(self) -> None:
        for norm in (self.memory_norm, self.attention_norm, self.ffn_norm,
                     getattr(self, "gate_norm_attention", None), getattr(self, "gate_norm_memory", None)):
            if norm is not None:
                norm.init_weights()
        if self.variant == "mag":
            nn.init.trunc_normal_(self.gate_proj.weight, std=self.out_std)
        self.memory.init_weights(self.out_std)
        if self.attention is not None:
            self.attention.init_weights(self.out_std)
        self.feed_forward.init_weights(self.out_std)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        h = self.memory_norm(x)
        if self.variant == "mac":
            x = x + self._mac(h, freqs)[0]
        elif self.variant == "mag":
            y_attn = self.attention(h, sliding_window_mask_mod(self.tcfg.n_persistent, self.tcfg.window), freqs[:T])
            y_mem = self._memory_over_persistent(h)
            x = x + self.gate_proj(self.gate_norm_attention(y_attn) * torch.sigmoid(self.gate_norm_memory(y_mem)))
        elif self.variant == "mal":
            x = x + self._memory_over_persistent(h)
            mask = sliding_window_mask_mod(self.tcfg.n_persistent, self.tcfg.window)
            x = x + self.attention(self.attention_norm(x), mask, freqs[:T])
        else:
            x = x + self.memory(h)[0]
        return x + self.feed_forward(self.ffn_norm(x))

    def _memory_over_persistent(self, h: torch.Tensor) -> torch.Tensor:
        """MAG/MAL: the memory over x~ = [p || h] (Eq. 19: p prepended to the sequence), its outputs
        at h's positions [B, T, C]; p (the attention's persistent tokens) enters first."""
        P = self.tcfg.n_persistent
        if not P:
            return self.memory(h)[0]
        p = self.attention.persistent.to(h.dtype).expand(h.shape[0], P, -1)
        return self.memory(torch.cat([p, h], 1))[0][:, P:]

    def _mac(self, h: torch.Tensor, freqs: torch.Tensor, initial_state=None):
        """MAC's segment loop over h [B, T, C] -> (out [B, T, C], final state). The state that
        continues a sequence (context parallelism) is ((weights, momentum), the conv cache of y, the
        conv cache of the queries of h); a piece must start on a segment boundary."""
        mem, att, P, seg_len = self.memory, self.attention, self.tcfg.n_persistent, self.tcfg.segment_len
        B, T, _ = h.shape
        # Whatever reads only the layer input is computed for all segments at once, before the
        # segment loop: the memory's queries and read gate, the attention's projections of S
        # (segment-local RoPE positions t mod seg_len) and the persistent keys/values.
        seg_freqs = freqs[torch.arange(T, device=h.device) % seg_len]
        state, cache, q_cache = initial_state if initial_state is not None else (mem.initial_state(), None, None)
        fuse = mem.fuse_projections and att.fuse_projections
        if fuse:  # the five projections of h as one matmul (one gradient for h, not five summed)
            lins = (mem.wq, mem.w_gate, att.wq, att.wk, att.wv)
            parts = F.linear(h, torch.cat([lin.weight for lin in lins])).split([lin.out_features for lin in lins], -1)
            q_x, q_cache = mem.query(h, q_cache, projected=parts[0])
            gate_x = mem.out_gate(h, projected=parts[1])
            q_s, k_s = (apply_rope(att._heads(t), seg_freqs) for t in parts[2:4])
            v_s = att._heads(parts[4])
        else:
            q_x, q_cache = mem.query(h, q_cache)
            gate_x = mem.out_gate(h)
            q_s, (k_s, v_s) = att.project_q(h, seg_freqs), att.project_kv(h, seg_freqs)
        persistent = att.persistent_kv(B) or ()
        masks = {}
        # Weights the loop projects every segment with, concatenated once: one matmul per segment
        # for the memory's q, k, v and gates of y, one for the attention's keys and values of h.
        # With fused projections, the retrieved tokens' output projection (the memory's wo) and the
        # attention's keys/values of them are one product: k_h, v_h = (norm(read) * gate) (W_kv W_o)^T.
        fused, kv_weight = mem.update_projection(), att.kv_weight(mem.wo.weight if fuse else None)
        ys, os = [], []
        # split, not per-segment slicing: each slice's backward writes a full-length zero gradient,
        # which made the backward quadratic in T (64 segments x 5 tensors of [B, T, C] at T = 4k).
        segments = list(zip(*(t.split(seg_len, 1) for t in (q_x, gate_x, q_s, k_s, v_s))))
        # Eq. 21: retrieve from the memory as it stands before the segment: the first from the
        # initial weights, each later one by the previous segment's update, which reads the
        # segment's queries from the memory it leaves (in the same C call on CPU).
        read = mem.retrieve(segments[0][0], state)
        for i, (_, gate, q_seg, k_seg, v_seg) in enumerate(segments):
            L = q_seg.shape[1]
            # Eq. 22-23: attention over [persistent | retrieved | segment] (one concatenation each;
            # the mask is the same for every full segment, built once).
            if fuse:
                k_h, v_h = att.project_kv(mem.read_gated(read, gate), freqs[:L], kv_weight)
            else:
                k_h, v_h = att.project_kv(mem.read_out(read, None, gate), freqs[:L], kv_weight)
            if L not in masks:  # (FlexAttention, where masked_attention picks it, ignores the dense mask)
                mask_mod = mac_mask_mod(P, L)
                masks[L] = (mask_mod, dense_mask(mask_mod, L, P + 2 * L, h.device))
            y = att.attend(q_seg, torch.cat([*persistent[:1], k_h, k_seg], 1),
                           torch.cat([*persistent[1:], v_h, v_seg], 1), masks[L][0], dense=masks[L][1])
            # Eq. 24: update the memory with y (conv caches continue the y stream across segments).
            q_y, k_y, v_y, gates, cache = mem.project(y, cache, fused)
            if i + 1 < len(segments):
                o, state, read = mem.update(q_y, k_y, v_y, gates, state, read_after=segments[i + 1][0])
            else:
                o, state = mem.update(q_y, k_y, v_y, gates, state)
            ys.append(y)
            os.append(o)
        # Eq. 25: gate y with the updated memory's (causal) read; per token, so once for all segments.
        y, o = torch.cat(ys, 1), torch.cat(os, 1)
        return y * torch.sigmoid(mem.read_out(o, y)), (state, cache, q_cache)

    def attention_context(self) -> int:
        t = self.tcfg
        return {"mac": t.n_persistent + 2 * t.segment_len, "mag": t.n_persistent + t.window,
                "mal": t.n_persistent + t.window, "lmm": 0}[self.variant]


class Titans(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, nn.ModuleDict({str(i): TitansBlock(cfg) for i in range(cfg.n_layers)}), rope=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers.values():
            h = layer(h, self.freqs)
        return self.head(h)

    def flops_per_token(self, seq_len: int) -> float:
        """6N over the ordinary matmuls, plus attention scores (6 * context * C per layer, the Llama
        rule with the bounded context), plus 3x the memory's inner-loop forward FLOPs."""
        c = self.cfg
        n_params = sum(p.numel() for name, p in self.named_parameters()
                       if "tok_embeddings" not in name and ".memory.memory." not in name)
        if self.output is None:
            n_params += c.vocab_size * c.d_model
        flops = 6.0 * n_params
        for layer in self.layers.values():
            flops += 6.0 * min(layer.attention_context(), seq_len + c.titans.n_persistent) * c.d_model
            flops += 3.0 * layer.memory.flops_per_token()
        return flops


def build(cfg: ModelConfig) -> Titans:
    errs = cfg.titans.validate()
    if cfg.d_model % cfg.n_heads:
        errs.append(f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}")
    elif cfg.head_dim % 2:
        errs.append(f"head dim d_model/n_heads = {cfg.head_dim} must be even for rotary embeddings")
    if errs:
        raise ValueError("invalid Titans config:\n  - " + "\n  - ".join(errs))
    return Titans(cfg)
