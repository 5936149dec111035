"""Transformer² in training and at inference: SVF setup with an SVD cache, the REINFORCE objective
with a KL penalty, z-vector files, and few-shot adaptation by the cross-entropy method (CEM).

Sun, Cetin, Tang 2025 (arXiv 2501.06252). The SVF transform itself is `models/svf.py`.

- SVD cache: the decomposition of every selected matrix is computed once, in float64, and saved
  as `svd-<hash>.safetensors` beside the checkpoint it came from (the hash covers the target
  patterns and the weights' names and shapes); a later run with the same base reads it. Across
  ranks the matrices are divided round-robin, each rank decomposes its share and the factors are
  broadcast from their owners, so the work is split and every rank ends with identical factors.
- REINFORCE (the paper's objective where an answer can be checked): for a prompt, sample an
  answer from the adapted model, reward r = +1 if it matches exactly, -1 otherwise, and minimise
  -r * log p(answer) + kl_coef * KL(p_adapted || p_base) over the answer positions, the base
  policy being the same model with z = 1.
- CEM (few-shot adaptation): search mixing weights alpha of K experts, z' = sum_k alpha_k z_k, by
  sampling alpha ~ N(mu, sigma), keeping the best `elite` by score on a handful of examples, and
  refitting mu, sigma to them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from titanforge.models.svf import SVFConfig, SVFLinear, apply_svf, svd_factors, svf_modules, svf_targets


def _cache_key(model: nn.Module, cfg: SVFConfig, names: List[str]) -> str:
    shapes = {n: list(model.get_submodule(n).weight.shape) for n in names}
    blob = json.dumps({"targets": cfg.targets, "exclude": cfg.exclude, "shapes": shapes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def compute_factors(model: nn.Module, names: List[str], rank: int = 0, world: int = 1,
                    group=None) -> Dict[str, tuple]:
    """(U, s, V^T) for each named nn.Linear: rank i decomposes names[i::world], then each result
    is broadcast from its owner (with world > 1 a process group must be initialised)."""
    out: Dict[str, tuple] = {}
    for i, n in enumerate(names):
        w = model.get_submodule(n).weight
        owner = i % world
        if owner == rank:
            U, s, Vh = svd_factors(w)
        else:
            r = min(w.shape)
            U, s, Vh = (w.new_empty(w.shape[0], r), w.new_empty(r), w.new_empty(r, w.shape[1]))
        if world > 1:
            import torch.distributed as dist
            for t in (U, s, Vh):
                dist.broadcast(t, src=dist.get_global_rank(group, owner) if group is not None else owner, group=group)
        out[n] = (U, s, Vh)
    return out


def prepare_svf(model: nn.Module, cfg: SVFConfig, cache_dir: Path | None = None,
                rank: int = 0, world: int = 1, group=None) -> List[str]:
    """Decompose the selected matrices (reading or writing the SVD cache in `cache_dir`) and turn
    `model` into its SVF form in place. Returns the decomposed names."""
    from safetensors.torch import load_file, save_file

    names = svf_targets(model, cfg)
    if not names:
        apply_svf(model, cfg)  # raises with the names that exist
    path = Path(cache_dir) / f"svd-{_cache_key(model, cfg, names)}.safetensors" if cache_dir else None
    factors: Dict[str, tuple] | None = None
    if path is not None and path.exists():
        flat = load_file(str(path))
        try:
            factors = {n: (flat[f"{n}.U"], flat[f"{n}.s"], flat[f"{n}.Vh"]) for n in names}
        except KeyError as e:
            raise ValueError(f"SVD cache {path} lacks {e}; delete it to recompute") from None
        # The cache belongs to one set of base weights: check it reproduces them.
        for n in names[:1]:
            U, s, Vh = factors[n]
            w = model.get_submodule(n).weight.detach().to(torch.float64)
            err = ((U.double() * s.double()) @ Vh.double() - w).norm() / w.norm().clamp_min(1e-30)
            if err > 1e-4:
                raise ValueError(f"SVD cache {path} does not reproduce the base weight {n} "
                                 f"(relative error {err:.2e}); delete it to recompute")
    if factors is None:
        factors = compute_factors(model, names, rank, world, group)
        if path is not None and rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({f"{n}.{k}": t.contiguous() for n, f in factors.items() for k, t in zip(("U", "s", "Vh"), f)},
                      str(tmp))
            tmp.replace(path)
    return apply_svf(model, cfg, factors)


@contextlib.contextmanager
def base_policy(model: nn.Module):
    """Run `model` as its base (every z = 1) inside the block, restoring the z-vectors after."""
    mods = list(svf_modules(model).values())
    saved = [m.z.detach().clone() for m in mods]
    try:
        with torch.no_grad():
            for m in mods:
                m.z.fill_(1.0)
        yield model
    finally:
        with torch.no_grad():
            for m, z in zip(mods, saved):
                m.z.copy_(z)


@torch.no_grad()
def sample_answer(model: nn.Module, prompt: torch.Tensor, n_tokens: int, generator: torch.Generator | None = None,
                  greedy: bool = False) -> torch.Tensor:
    """[B, n_tokens] answer tokens sampled after `prompt` [B, T] (full forward per token: our
    models have no KV cache; answers are a few tokens)."""
    seq = prompt
    for _ in range(n_tokens):
        logits = model(seq)[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.shape[1]:]


def reinforce_loss(model: nn.Module, prompt: torch.Tensor, answer: torch.Tensor, target: torch.Tensor,
                   kl_coef: float, generator: torch.Generator | None = None,
                   sample: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The paper's REINFORCE objective on a batch of prompts [B, T] with reference answers [B, A].

    A sample [B, A] is drawn from the adapted model (or given); reward r_b = +1 if it equals the
    reference exactly, else -1; loss = mean_b(-r_b * sum_a log p(sample_ba)) + kl_coef *
    mean over the answer positions of KL(p_adapted || p_base)."""
    del answer  # the reference is `target`; kept for a uniform signature with the CE objective
    A = target.shape[1]
    if sample is None:
        sample = sample_answer(model, prompt, A, generator)
    seq = torch.cat([prompt, sample], dim=1)
    # Positions whose next token is an answer token: T-1 .. T+A-2.
    logits = model(seq[:, :-1])[:, prompt.shape[1] - 1:].float()
    logp = F.log_softmax(logits, -1)
    with base_policy(model), torch.no_grad():
        base_logp = F.log_softmax(model(seq[:, :-1])[:, prompt.shape[1] - 1:].float(), -1)
    reward = (sample == target).all(dim=1).to(logp.dtype) * 2 - 1
    log_prob = logp.gather(-1, sample.unsqueeze(-1)).squeeze(-1).sum(1)
    pg = -(reward * log_prob).mean()
    kl = (logp.exp() * (logp - base_logp)).sum(-1).mean()
    return pg + kl_coef * kl, {"reward": reward.mean().item(), "kl": kl.item()}


def cem_search(score: Callable[[torch.Tensor], float], k: int, iters: int = 20, population: int = 32,
               elite: int = 8, init_std: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Mixing weights alpha [k] maximising `score(alpha)` by the cross-entropy method: mu starts
    at 1/k for every expert, sigma at init_std; each iteration samples `population` alphas,
    keeps the `elite` best and refits mu and sigma to them. Returns the best alpha seen."""
    if not 0 < elite <= population:
        raise ValueError(f"elite={elite} must be in 1..population={population}")
    g = torch.Generator().manual_seed(seed)
    mu = torch.full((k,), 1.0 / k, dtype=torch.float64)
    sigma = torch.full((k,), init_std, dtype=torch.float64)
    best, best_score = mu.clone(), score(mu)
    for _ in range(iters):
        cand = mu + sigma * torch.randn(population, k, generator=g, dtype=torch.float64)
        scores = torch.tensor([score(c) for c in cand], dtype=torch.float64)
        order = scores.argsort(descending=True)[:elite]
        top = cand[order]
        if scores[order[0]] > best_score:
            best, best_score = top[0].clone(), float(scores[order[0]])
        mu, sigma = top.mean(0), top.std(0, unbiased=False).clamp_min(1e-4)
    return best


@torch.no_grad()
def classify_task(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, tag_ids: List[int]) -> torch.Tensor:
    """The first pass of the prompt and classifier strategies: [B] index into `tag_ids` of the tag
    the model rates highest at the position `mask` [B, T-1] marks (one per row: the position
    after the adaptation prompt, whose next token names the task). `tokens` [B, T]."""
    if (mask.sum(1) != 1).any():
        raise ValueError("classify_task: the mask must mark exactly one position per row (the tag's)")
    logits = model(tokens[:, :-1])
    rows = torch.arange(len(tokens))
    at = logits[rows, mask.to(torch.long).argmax(1)]
    return at[:, torch.as_tensor(tag_ids, device=at.device)].argmax(-1)


def adapt_few_shot(model: nn.Module, experts: List[Dict[str, torch.Tensor]], score: Callable[[nn.Module], float],
                   **cem_kw) -> torch.Tensor:
    """The few-shot strategy: CEM over mixing weights alpha of `experts` (z-vector dicts), each
    candidate scored as `score(model)` with the SVF model's z set to sum_k alpha_k z_k (on a
    handful of examples of the target task). Returns the best alpha; the model's z-vectors are
    left as they were."""
    from titanforge.models.svf import load_z, mix_z, z_state_dict

    saved = z_state_dict(model)

    def evaluate(alpha: torch.Tensor) -> float:
        load_z(model, mix_z(experts, alpha))
        return float(score(model))

    try:
        return cem_search(evaluate, len(experts), **cem_kw)
    finally:
        load_z(model, saved)


def save_z(path: str | Path, zs: Dict[str, torch.Tensor], meta: Dict[str, str] | None = None) -> None:
    """One expert's z-vectors as a small safetensors file (`titanforge svf export`)."""
    from safetensors.torch import save_file
    save_file({n: z.contiguous() for n, z in zs.items()}, str(path), metadata=meta or {})


def read_z(path: str | Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a z-vector file written by `titanforge svf export` ({e})") from None


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n_train, n_all


__all__ = ["SVFLinear", "adapt_few_shot", "base_policy", "cem_search", "classify_task", "compute_factors", "prepare_svf", "read_z",
           "reinforce_loss", "sample_answer", "save_z", "trainable_summary"]

