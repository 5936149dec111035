"""Context parallelism: each sample's sequence split over the cp ranks of a group, exactly.

Rank r of a cp group holds tokens [r T/cp, (r+1) T/cp) of every sample of its data-parallel
batch; outside the sequence mixers every layer works on those T/cp tokens alone. Applied after
the model is built, like tensor parallelism: `apply_context_parallel` swaps the forward of each
sequence mixer for one that exchanges what crosses a rank boundary. The models never see a
process group; their recurrent mixers expose an initial and a final state and this file moves it.

Per mixer (docs/design.md, "Context parallelism", says why):
- full causal attention (Llama, Jamba's attention layers): keys and values all-gathered over the
  group; queries attend to the keys up to their own position in key blocks with a running
  log-sum-exp (`offset_causal_attention`: no [T/cp, T] score matrix is kept, so memory per rank is
  linear in T/cp), blocks after the diagonal skipped; backward: the key/value gradients summed
  back to their owners. Split `zigzag` (default): the sequence is cut into 2 cp half-pieces and
  rank r attends for the queries of halves r and 2cp-1-r (sent there point-to-point and the
  outputs sent back), so every rank computes 2cp+1 half-blocks; `contiguous`: each rank attends
  for its own piece, r+1 blocks, the last rank about 2cp-1 times the first's work;
- sliding-window attention (Titans MAG, MAL): the last window-1 keys/values go to the next rank;
- recurrent mixers (Mamba-1/2 scan and conv, the TTT inner model and its convs, the Titans memory
  with its momentum and conv caches, MAC's whole segment loop): a state hand-off. Rank r waits for
  rank r-1's final state of a layer, runs its piece from it, and sends its own final state on;
  in backward the gradient of the received state goes back to r-1, which folds it into its own
  backward. Exact (the same recurrence, cut where a piece boundary already is); the ranks run
  as a pipeline over the layers, so rank r starts layer l as soon as rank r-1 finished it.

Every exchange is point-to-point with a tag from a per-call counter that advances identically on
every rank, so forward and backward messages of different layers never pair up wrongly.

Activation checkpointing (non-reentrant): the recompute in backward cannot receive a state again
(the previous rank may be blocked in its own backward, waiting for this rank's gradient: TTT,
whose whole block is the mixer, deadlocks so), so each
checkpointed call keeps the states it received and its recompute replays them and sends nothing
(`ContextGroup.checkpoint_contexts`); the collectives of full attention run again, in the same
order on every rank. Backward runs the original forward's send/receive nodes and tags.

Limits: splits must fall on the memory chunk grid (Titans chunk_size, TTT mini_batch_size) and on
MAC segments; the zig-zag split needs T divisible by 2 cp.
"""

from __future__ import annotations

import pickle
import warnings
import weakref
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from titanforge.models.common import Attention, apply_rope
from titanforge.models.common.mamba import Mamba2Mixer, MambaMixer

# Tags per exchange site: forward messages use the first half, backward the second.
_TAGS_PER_SITE = 64
_TAG_WRAP = 1 << 24
# model -> its ContextGroup, for callers that want the byte counter or the state record.
_GROUPS: "weakref.WeakKeyDictionary[nn.Module, ContextGroup]" = weakref.WeakKeyDictionary()


class ContextGroup:
    """A cp process group and this rank's neighbours in it; counts the bytes it sends."""

    # How full causal attention divides its queries: "zigzag" or "contiguous" (apply_context_parallel).
    split = "contiguous"
    # Under activation checkpointing (checkpoint_contexts): the list the current checkpointed
    # forward appends its received states to, and the iterator a recompute takes them back from.
    _recording: list | None = None
    _replay = None
    # Score elements (query rows x keys) the blockwise attention computed in forward, this rank.
    attention_scores = 0
    # States a checkpoint recompute took from its forward's record instead of receiving them.
    replayed = 0

    def __init__(self, group):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.ranks = [dist.get_global_rank(group, r) for r in range(self.size)]
        self.prev = dist.get_global_rank(group, self.rank - 1) if self.rank > 0 else None
        self.next = dist.get_global_rank(group, self.rank + 1) if self.rank + 1 < self.size else None
        self.nccl = dist.get_backend(group) == "nccl"
        self._site = 0
        # When a list: every state this rank receives in forward, as detached pytrees (tests).
        self.record: list | None = None
        # Payload bytes this rank sent (forward and backward; not the small shape headers; a ring
        # all-reduce of N bytes counted as 2 (cp-1)/cp N), for the benchmark.
        self.bytes_sent = 0

    def new_site(self) -> int:
        """The base tag of the next exchange; every rank calls this once per exchange site."""
        self._site += 1
        return (self._site * _TAGS_PER_SITE) % _TAG_WRAP

    def _isend(self, t: torch.Tensor, dst: int, tag: int, count: bool = True):
        t = t.contiguous()
        if count:
            self.bytes_sent += t.numel() * t.element_size()
        return dist.isend(t, dst, group=self.group, tag=tag)

    def send(self, tag: int, carrier: torch.Tensor, state) -> torch.Tensor:
        """Send `state` (a pytree of tensors) to the next rank; returns `carrier` unchanged. Its
        backward receives the state's gradient from the next rank, so `carrier` must be a tensor
        the loss depends on and whose gradient arrives after the state's consumers on this rank.
        In a checkpoint recompute nothing is sent: the next rank replays what it received, and
        the original forward's send node is the one backward runs."""
        if self.next is None or self._replay is not None:
            return carrier
        leaves, spec = pytree.tree_flatten(state)
        if len(leaves) + 2 > _TAGS_PER_SITE // 2:
            raise ValueError(f"a context-parallel state of {len(leaves)} tensors exceeds the "
                             f"{_TAGS_PER_SITE // 2 - 2} one exchange site carries")
        meta = pickle.dumps((spec, [(tuple(t.shape), t.dtype) for t in leaves]))
        header = torch.frombuffer(bytearray(meta), dtype=torch.uint8).to(carrier.device)
        length = torch.tensor([header.numel()], dtype=torch.int64, device=carrier.device)
        works = [self._isend(length, self.next, tag, False), self._isend(header, self.next, tag + 1, False)]
        out = _SendState.apply(self, tag, carrier, *leaves)
        for w in works:
            w.wait()
        return out

    def receive(self, tag: int, device: torch.device):
        """The state the previous rank sent from the same site (None on the first rank)."""
        if self.prev is None:
            return None
        if self._replay is not None:
            # A checkpoint recompute: the state this forward received the first time (it cannot be
            # received again: the previous rank may be waiting on this rank's backward). Fresh
            # leaves that require grad as the originals did, so the recompute saves the same tensors.
            spec, leaves = next(self._replay)
            self.replayed += 1
            grad = torch.is_grad_enabled()
            return pytree.tree_unflatten([t.detach().requires_grad_(grad and t.is_floating_point())
                                          for t in leaves], spec)
        length = torch.empty(1, dtype=torch.int64, device=device)
        dist.recv(length, self.prev, group=self.group, tag=tag)
        header = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
        dist.recv(header, self.prev, group=self.group, tag=tag + 1)
        with warnings.catch_warnings():  # torch's TreeSpec unpickling warns about its own LeafSpec
            warnings.simplefilter("ignore", FutureWarning)
            spec, meta = pickle.loads(header.cpu().numpy().tobytes())
        anchor = torch.empty(0, device=device, requires_grad=torch.is_grad_enabled())
        leaves = _RecvState.apply(self, tag, meta, anchor)
        if self.record is not None:
            self.record.append(pytree.tree_unflatten([t.detach().clone() for t in leaves], spec))
        if self._recording is not None:
            self._recording.append((spec, [t.detach() for t in leaves]))
        return pytree.tree_unflatten(list(leaves), spec)

    def checkpoint_contexts(self):
        """`context_fn` for non-reentrant activation checkpointing of one block call: the forward
        keeps the states the block receives (small: a state, or a window of keys/values), the
        recompute in backward takes them back instead of receiving. Collectives (the K/V gather,
        the zig-zag exchange) are simply run again: every rank recomputes the same blocks in the
        same order, and the tags come from the same counter."""
        states: list = []
        return _Swap(self, "_recording", states), _Swap(self, "_replay", states, iter)


class _Swap:
    """Context manager: sets cg.<name> (to make(value)) and restores the previous value."""

    def __init__(self, cg, name, value, make=lambda v: v):
        self.cg, self.name, self.value, self.make = cg, name, value, make

    def __enter__(self):
        self.prev = getattr(self.cg, self.name)
        setattr(self.cg, self.name, self.make(self.value))

    def __exit__(self, *exc):
        setattr(self.cg, self.name, self.prev)


class _SendState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cg, tag, carrier, *leaves):
        works = [cg._isend(t.detach(), cg.next, tag + 2 + i) for i, t in enumerate(leaves)]
        for w in works:
            w.wait()
        ctx.cg, ctx.tag = cg, tag
        ctx.meta = [(t.shape, t.dtype, t.device) for t in leaves]
        return carrier.view_as(carrier)

    @staticmethod
    def backward(ctx, grad):
        cg, base = ctx.cg, ctx.tag + _TAGS_PER_SITE // 2
        grads = []
        for i, (shape, dtype, device) in enumerate(ctx.meta):
            g = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(g, cg.next, group=cg.group, tag=base + i)
            grads.append(g)
        return (None, None, grad, *grads)


class _RecvState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cg, tag, meta, anchor):
        leaves = []
        for i, (shape, dtype) in enumerate(meta):
            t = torch.empty(shape, dtype=dtype, device=anchor.device)
            dist.recv(t, cg.prev, group=cg.group, tag=tag + 2 + i)
            leaves.append(t)
        ctx.cg, ctx.tag = cg, tag
        return tuple(leaves)

    @staticmethod
    def backward(ctx, *grads):
        cg, base = ctx.cg, ctx.tag + _TAGS_PER_SITE // 2
        works = [cg._isend(g, cg.prev, base + i) for i, g in enumerate(grads)]
        for w in works:
            w.wait()
        return None, None, None, None


class _GatherSequence(torch.autograd.Function):
    """[B, T/cp, ...] on each rank -> [B, T, ...] in rank order; backward sums the gradient over
    the group and keeps this rank's slice (a reduce-scatter; gloo has none, so all-reduce)."""

    @staticmethod
    def forward(ctx, cg, x):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(cg.size)]
        dist.all_gather(parts, x, group=cg.group)
        cg.bytes_sent += x.numel() * x.element_size() * (cg.size - 1)
        ctx.cg = cg
        return torch.cat(parts, 1)

    @staticmethod
    def backward(ctx, grad):
        cg = ctx.cg
        grad = grad.contiguous()
        if cg.nccl:
            parts = list(grad.chunk(cg.size, 1))
            out = torch.empty_like(parts[cg.rank])
            dist.reduce_scatter(out, [p.contiguous() for p in parts], group=cg.group)
            return None, out
        dist.all_reduce(grad, group=cg.group)
        cg.bytes_sent += 2 * grad.numel() * grad.element_size() * (cg.size - 1) // cg.size
        return None, grad.chunk(cg.size, 1)[cg.rank].contiguous()


def gather_sequence(cg: ContextGroup, x: torch.Tensor) -> torch.Tensor:
    return _GatherSequence.apply(cg, x) if cg.size > 1 else x


def shard_sequence(tokens: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This cp rank's piece of a [B, T + 1] token batch: its T/cp inputs and their next tokens
    ([B, T/cp + 1], overlapping the next rank's piece by one token)."""
    T = tokens.shape[1] - 1
    if T % size:
        raise ValueError(f"sequence length {T} is not divisible by parallel.cp={size}")
    n = T // size
    return tokens[:, rank * n:(rank + 1) * n + 1]


SPLITS = ("zigzag", "contiguous")

# Keys per block of the offset causal attention: the scores it holds at once are [B, H, T/cp, block].
KV_BLOCK = 512


class _OffsetCausalAttention(torch.autograd.Function):
    """Grouped-query causal attention of T queries at global positions offset..offset+T-1 over
    S keys at positions 0..S-1 (query i sees key j iff j <= offset + i), in key blocks with a
    running log-sum-exp (flash-attention's recurrence, in PyTorch). Saves q, k, v, the output and
    the log-sum-exp ([B, H, T]); backward recomputes each block's scores. So no [T, S] matrix is
    ever kept, which SDPA's CPU math path (the only one taking a mask) does for backward.
    q [B, T, H, D], k/v [B, S, G, D] -> [B, T, H, D]."""

    @staticmethod
    def _blocks(q, offset, S, block):
        """(j0, j1, mask or None) per key block that some query sees; mask True = hidden."""
        T = q.shape[-2]
        pos = torch.arange(T, device=q.device)[:, None] + offset
        for j0 in range(0, min(S, offset + T), block):
            j1 = min(j0 + block, S)
            hidden = None
            # A key after the first query's position: the diagonal crosses this block.
            if j1 - 1 > offset:
                hidden = torch.arange(j0, j1, device=q.device)[None, :] > pos
            yield j0, j1, hidden

    @staticmethod
    def _heads(q, k, v):
        B, T, H, D = q.shape
        G = k.shape[2]
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        # Query head h uses key/value head h // (H/G), as SDPA's enable_gqa does.
        qh = q.reshape(B, T, G, H // G, D).permute(0, 2, 3, 1, 4).to(acc)  # [B, G, R, T, D]
        kh, vh = (t.permute(0, 2, 1, 3).unsqueeze(2).to(acc) for t in (k, v))  # [B, G, 1, S, D]
        return qh, kh, vh

    @staticmethod
    def forward(ctx, q, k, v, offset: int, block: int, work):
        B, T, H, D = q.shape
        scale = D ** -0.5
        qh, kh, vh = _OffsetCausalAttention._heads(q, k, v)
        out = torch.zeros_like(qh)
        lse = torch.full(qh.shape[:-1], float("-inf"), dtype=qh.dtype, device=q.device)
        # Key 0 is in the first block and every query sees it, so lse is finite after that block.
        for j0, j1, hidden in _OffsetCausalAttention._blocks(qh, offset, k.shape[1], block):
            s = (qh @ kh[..., j0:j1, :].transpose(-1, -2)) * scale  # [B, G, R, T, b]
            if work is not None:
                work.attention_scores += T * (j1 - j0)
            if hidden is not None:
                s.masked_fill_(hidden, float("-inf"))
            new = torch.logaddexp(lse, torch.logsumexp(s, -1))
            out = out * (lse - new).exp().unsqueeze(-1) + (s - new.unsqueeze(-1)).exp() @ vh[..., j0:j1, :]
            lse = new
        result = out.permute(0, 3, 1, 2, 4).reshape(B, T, H, D).to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.offset, ctx.block = offset, block
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, result, lse = ctx.saved_tensors
        B, T, H, D = q.shape
        S, G = k.shape[1], k.shape[2]
        scale = D ** -0.5
        qh, kh, vh = _OffsetCausalAttention._heads(q, k, v)
        do, o = (t.reshape(B, T, G, H // G, D).permute(0, 2, 3, 1, 4).to(qh.dtype) for t in (grad, result))
        delta = (do * o).sum(-1, keepdim=True)  # [B, G, R, T, 1]
        dq = torch.zeros_like(qh)
        dk = qh.new_zeros(B, G, S, D)
        dv = qh.new_zeros(B, G, S, D)
        for j0, j1, hidden in _OffsetCausalAttention._blocks(qh, ctx.offset, S, ctx.block):
            kb, vb = kh[..., j0:j1, :], vh[..., j0:j1, :]
            s = (qh @ kb.transpose(-1, -2)) * scale
            if hidden is not None:
                s.masked_fill_(hidden, float("-inf"))
            # The softmax itself: lse is the whole row's, from forward.
            p = (s - lse.unsqueeze(-1)).exp()
            dv[:, :, j0:j1] = (p.transpose(-1, -2) @ do).sum(2)
            ds = p * (do @ vb.transpose(-1, -2) - delta) * scale
            dq += ds @ kb
            dk[:, :, j0:j1] = (ds.transpose(-1, -2) @ qh).sum(2)
        dq = dq.permute(0, 3, 1, 2, 4).reshape(B, T, H, D).to(q.dtype)
        dk, dv = (t.permute(0, 2, 1, 3).to(k.dtype) for t in (dk, dv))
        return dq, dk, dv, None, None, None


def offset_causal_attention(q, k, v, offset: int, block: int | None = None, work=None) -> torch.Tensor:
    """Causal attention of queries at positions offset.. over keys at 0..; see _OffsetCausalAttention.
    `work`: an object whose `attention_scores` counts the score elements computed (a ContextGroup)."""
    return _OffsetCausalAttention.apply(q, k, v, offset, block or KV_BLOCK, work)


def _contiguous_half(h: int, n: int) -> tuple[int, int]:
    """(rank, slot) holding half-piece h of 2n in the contiguous split: rank h // 2."""
    return h // 2, h % 2


def _zigzag_half(h: int, n: int) -> tuple[int, int]:
    """(rank, slot) holding half-piece h of 2n in the zig-zag split: rank r holds r and 2n-1-r."""
    return (h, 0) if h < n else (2 * n - 1 - h, 1)


def _move_halves(cg: ContextGroup, x: torch.Tensor, src, dst, tag: int) -> torch.Tensor:
    """x [B, 2c, ...]: this rank's two half-pieces in layout `src` -> its two in layout `dst`
    (point-to-point; a half that stays on this rank is not sent)."""
    parts = x.chunk(2, 1)
    out: list = [None, None]
    ops = []
    for h in range(2 * cg.size):
        (s_rank, s_slot), (d_rank, d_slot) = src(h, cg.size), dst(h, cg.size)
        if s_rank == cg.rank and d_rank == cg.rank:
            out[d_slot] = parts[s_slot]
        elif s_rank == cg.rank:
            t = parts[s_slot].contiguous()
            cg.bytes_sent += t.numel() * t.element_size()
            # At most two halves go from one rank to another per call: the source slot tells them apart.
            ops.append(dist.P2POp(dist.isend, t, cg.ranks[d_rank], cg.group, tag + s_slot))
        elif d_rank == cg.rank:
            out[d_slot] = torch.empty_like(parts[0], memory_format=torch.contiguous_format)
            ops.append(dist.P2POp(dist.irecv, out[d_slot], cg.ranks[s_rank], cg.group, tag + s_slot))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return torch.cat(out, 1)


class _Zigzag(torch.autograd.Function):
    """Contiguous -> zig-zag order of this rank's half-pieces (inverse=True: back); the backward
    moves the gradient the other way."""

    @staticmethod
    def forward(ctx, cg, x, inverse: bool):
        src, dst = (_zigzag_half, _contiguous_half) if inverse else (_contiguous_half, _zigzag_half)
        tag = cg.new_site()
        ctx.cg, ctx.tag, ctx.src, ctx.dst = cg, tag, src, dst
        return _move_halves(cg, x, src, dst, tag)

    @staticmethod
    def backward(ctx, grad):
        return None, _move_halves(ctx.cg, grad.contiguous(), ctx.dst, ctx.src, ctx.tag + _TAGS_PER_SITE // 2), None


# The forwards swapped in, one per kind of mixer. Each is bound to its module with functools.partial.

def _full_attention_forward(cg: ContextGroup, self: Attention, x, freqs=None, *, attn_mask=None):
    if attn_mask is not None:
        raise ValueError("context-parallel attention builds its own causal mask; got attn_mask")
    B, T, _ = x.shape
    q = self.wq(x).view(B, T, -1, self.head_dim)
    k = self.wk(x).view(B, T, -1, self.head_dim)
    v = self.wv(x).view(B, T, -1, self.head_dim)
    if freqs is not None:
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
    # Keys and values in one gather: [B, T, 2G, D] -> [B, cp T, 2G, D].
    G = k.shape[2]
    kv = gather_sequence(cg, torch.cat([k, v], 2))
    if cg.split == "zigzag":
        # Load balance: the queries of the sequence's half-pieces r and 2cp-1-r are attended here
        # (2cp+1 key blocks on every rank, against r+1 double blocks under the contiguous split),
        # then the outputs go back to the contiguous layout the rest of the model keeps.
        c, r, n = T // 2, cg.rank, cg.size
        q = _Zigzag.apply(cg, q, False)
        k, v = kv[:, :(2 * n - r) * c].split(G, 2)
        block = min(c, KV_BLOCK)
        out = torch.cat([offset_causal_attention(q[:, :c], k[:, :(r + 1) * c], v[:, :(r + 1) * c], r * c, block, cg),
                         offset_causal_attention(q[:, c:], k, v, (2 * n - 1 - r) * c, block, cg)], 1)
        out = _Zigzag.apply(cg, out, True)
    else:
        k, v = kv[:, :(cg.rank + 1) * T].split(G, 2)
        # Key blocks of this rank's piece length (at most KV_BLOCK): the earlier ranks' blocks need
        # no mask, this rank's own is the causal triangle; memory per rank is linear in T/cp.
        out = offset_causal_attention(q, k, v, cg.rank * T, min(T, KV_BLOCK), cg)
    return self.wo(out.reshape(B, T, -1))


def _sliding_window_forward(cg: ContextGroup, window: int, self, x, mask_mod, freqs_q, context=None,
                            freqs_kv=None):
    """PersistentAttention over [persistent | x] with a sliding-window mask_mod: the previous
    rank's last window-1 keys/values are prepended, and the mask shifted by as many tokens."""
    if context is not None:
        raise ValueError("context-parallel sliding-window attention attends to its own input only")
    B, T, _ = x.shape
    q = self.project_q(x, freqs_q)
    k, v = self.project_kv(x, freqs_q)
    tag = cg.new_site()
    halo = min(window - 1, T)
    if halo:
        q = cg.send(tag, q, (k[:, T - halo:], v[:, T - halo:]))
        got = cg.receive(tag, x.device)
    else:
        got = None
    shift = 0
    if got is not None:
        shift = got[0].shape[1]
        k, v = torch.cat([got[0], k], 1), torch.cat([got[1], v], 1)

    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + shift, kv_idx)

    return self.attend(q, k, v, shifted, self.persistent_kv(B))


def _mamba_forward(cg: ContextGroup, orig, x, initial_state=None, output_final_state=False):
    tag = cg.new_site()
    got = cg.receive(tag, x.device)
    y, state = orig(x, got if got is not None else initial_state, True)
    y = cg.send(tag, y, state)
    return (y, state) if output_final_state else y


def _memory_forward(cg: ContextGroup, n_prefix: int, self, x, state=None):
    """NeuralMemory.forward with its conv caches and (weights, momentum) handed over.

    n_prefix: MAG/MAL's persistent tokens, which the block prepends to every rank's piece (x~ =
    [p || h]); they belong at the start of the whole sequence only, so a rank that continues the
    sequence drops them and returns zeros in their place (the block keeps only h's positions).
    With n_prefix a multiple of the chunk size the first rank's piece still ends on a chunk
    boundary (check_context), so the hand-off stays exact."""
    tag = cg.new_site()
    got = cg.receive(tag, x.device)
    prefix = None
    if got is not None and n_prefix:
        prefix, x = x[:, :n_prefix], x[:, n_prefix:]
    cache, mem_state = got if got is not None else (None, state or self.initial_state())
    q, k, v, gates, cache = self.project(x, cache, fused=self.update_projection())
    o, mem_state = self.update(q, k, v, gates, mem_state)
    out = cg.send(tag, _tie(self.read_out(o, x), got, self.memory.parameters()), (cache, mem_state))
    if prefix is not None:
        # Zero outputs at the dropped positions, tied to p so it has a (zero) gradient on every rank.
        out = torch.cat([prefix * 0.0, out], 1)
    return out, mem_state


def _tie(out: torch.Tensor, got, params) -> torch.Tensor:
    """On a rank that received its initial state, the initial-state parameters (read only on the
    first rank) still join this rank's graph, with a zero gradient: DDP and FSDP2 reduce the same
    set of gradients on every rank."""
    if got is None or not torch.is_grad_enabled():
        return out
    return out + sum(p.sum() for p in params) * 0.0


def _stateful_forward(cg: ContextGroup, orig, x, state=None):
    """A block with forward(x, state) -> (out, state): the TTT blocks (conv and inner model)."""
    tag = cg.new_site()
    got = cg.receive(tag, x.device)
    out, state = orig(x, got if got is not None else state)
    inner = orig.__self__.ttt
    out = cg.send(tag, _tie(out, got, [p for p in (inner.W1, inner.b1, inner.W2, inner.b2) if p is not None]), state)
    return out, state


def _mac_forward(cg: ContextGroup, orig, h, freqs, initial_state=None):
    tag = cg.new_site()
    got = cg.receive(tag, h.device)
    out, state = orig(h, freqs, got if got is not None else initial_state)
    out = cg.send(tag, _tie(out, got, orig.__self__.memory.memory.parameters()), state)
    return out, state


def _rope_offset_hooks(model: nn.Module, cg: ContextGroup) -> None:
    """Give this rank's tokens their global positions: the rotary table seen during a forward
    starts at rank * T/cp (restored after, so init and checkpoints see the whole table). The table
    is read at each call, not here: a model built on the meta device gets its real table when it
    is materialised, after this runs (the trainer's sharded start)."""
    held = {}

    def pre(module, args):
        T = args[0].shape[1]
        # A forward that raised never restored the table: its slice is still in place.
        if module.freqs is not held.get("piece"):
            held["full"] = module.freqs
        held["piece"] = module.freqs = held["full"][cg.rank * T:(cg.rank + 1) * T]

    def post(module, args, output):
        module.freqs = held["full"]

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post)


def context_group(model: nn.Module) -> ContextGroup | None:
    """The ContextGroup `apply_context_parallel` gave `model` (None if it has none)."""
    return _GROUPS.get(model)


def apply_context_parallel(model: nn.Module, family: str, group, split: str = "zigzag") -> ContextGroup:
    """Swap every sequence mixer of `model` for its context-parallel form over `group` (a process
    group, a 1-D DeviceMesh, or a ready ContextGroup). `split`: how full causal attention divides
    its queries over the ranks ("zigzag", load-balanced, or "contiguous"; the other mixers and
    the layers outside them always keep the contiguous pieces). Returns the ContextGroup (its
    byte counter and state record)."""
    if split not in SPLITS:
        raise ValueError(f"parallel.cp_split={split!r} must be one of {' | '.join(SPLITS)}")
    if isinstance(group, ContextGroup):
        cg = group
    else:
        cg = ContextGroup(group.get_group() if hasattr(group, "get_group") else group)
        if cg.size == 1:
            return cg
    cg.split = split
    _GROUPS[model] = cg
    bind = lambda fn, module, *a: setattr(module, "forward", partial(fn, cg, *a, module))  # noqa: E731
    wrap = lambda fn, module: setattr(module, "forward", partial(fn, cg, module.forward))  # noqa: E731
    positional = family == "llama" or (family == "titans" and model.cfg.titans.variant in ("mag", "mal"))
    for block in model.layers.values():
        if family == "llama":
            bind(_full_attention_forward, block.attention)
        elif family == "jamba":
            if isinstance(block.mixer, Attention):
                bind(_full_attention_forward, block.mixer)
            elif isinstance(block.mixer, (MambaMixer, Mamba2Mixer)):
                wrap(_mamba_forward, block.mixer)
            else:
                raise ValueError(f"no context-parallel form for mixer {type(block.mixer).__name__}")
        elif family == "ttt":
            wrap(_stateful_forward, block)
        elif family == "titans":
            variant = block.variant
            if variant == "mac":
                block._mac = partial(_mac_forward, cg, block._mac)
                continue
            bind(_memory_forward, block.memory, block.tcfg.n_persistent if variant in ("mag", "mal") else 0)
            if variant in ("mag", "mal"):
                bind(_sliding_window_forward, block.attention, block.tcfg.window)
        else:
            raise ValueError(f"context parallelism has no plan for model.family={family!r}")
    if positional:
        _rope_offset_hooks(model, cg)
    return cg


def uses_full_attention(model) -> bool:
    """Whether a `ModelConfig` has full causal attention layers (the ones `cp_split` applies to)."""
    return model.family == "llama" or (model.family == "jamba" and "A" in model.jamba.layer_pattern)


def check_context(model, cp: int, seq_len: int | None, tp: int = 1, split: str = "zigzag") -> list[str]:
    """Problems of splitting `seq_len` tokens of a `ModelConfig` over cp ranks; empty when it fits."""
    if split not in SPLITS:
        return [f"parallel.cp_split={split!r} must be one of {' | '.join(SPLITS)}"]
    if cp == 1:
        return []
    errs = []
    if split == "zigzag" and seq_len is not None and uses_full_attention(model) and seq_len % (2 * cp):
        return [f"sequence length {seq_len} is not divisible by 2 x parallel.cp = {2 * cp} (the zig-zag split "
                f"cuts it into 2 cp half-pieces); use a sequence length that is a multiple of {2 * cp} or "
                f"parallel.cp_split=contiguous"]
    grid, what = 1, ""
    fam = model.family
    if fam == "titans":
        t = model.titans
        grid, what = (t.segment_len, "model.titans.segment_len") if t.variant == "mac" else \
            (t.chunk_size, "model.titans.chunk_size")
    elif fam == "ttt":
        grid, what = model.ttt.mini_batch_size, "model.ttt.mini_batch_size"
    if seq_len is not None:
        unit = grid * cp
        if seq_len % unit:
            fits = [c for c in range(2, seq_len + 1) if seq_len % (c * grid) == 0][:6]
            per = f" (each rank's piece must be a multiple of {what}={grid})" if grid > 1 else ""
            fix = f"use parallel.cp in {fits} or" if fits else "no cp > 1 fits: use"
            errs.append(f"sequence length {seq_len} is not divisible by parallel.cp={cp} x {grid}{per}; "
                        f"{fix} a sequence length that is a multiple of {unit}"
                        + (f" or a smaller {what}" if grid > 1 else ""))
        elif fam == "titans" and model.titans.variant in ("mag", "mal") and model.titans.n_persistent % grid:
            t = model.titans
            ok = [t.chunk_size * i for i in range(0, 4)]
            errs.append(f"model.titans.n_persistent={t.n_persistent} must be a multiple of model.titans.chunk_size="
                        f"{t.chunk_size} under parallel.cp (MAG/MAL prepend the persistent tokens to the memory's "
                        f"input, which would shift the memory's chunk grid off the cp split); use n_persistent in {ok}")
        elif fam == "titans" and model.titans.variant in ("mag", "mal") and model.titans.window - 1 > seq_len // cp:
            errs.append(f"model.titans.window={model.titans.window} exceeds the {seq_len // cp} tokens per cp rank "
                        f"+ 1 (sliding-window keys come from the previous rank only); use parallel.cp <= "
                        f"{max(1, seq_len // max(1, model.titans.window - 1))} or a smaller window")
    return errs
