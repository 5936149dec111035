"""Transformer² in training and at inference: SVF setup with an SVD cache, the REINFORCE objective
with a KL penalty, z-vector files, and few-shot adaptation by the cross-entropy method (CEM).

Sun, Cetin, Tang 2025 (arXiv 2501.06252). The SVF transform itself is `models/svf.py`.

- SVD cache: the decomposition of every selected matrix is computed once, in float64, and saved
  in `svd-<hash>/` beside the checkpoint it came from, one file per matrix (the hash covers the
  target patterns and the weights' names and shapes); a later run with the same base reads it.
  Across ranks the matrices are divided round-robin, each rank decomposes its share and the
  factors are broadcast from their owners, so the work is split and every rank ends with
  identical factors.
- Sharded start (`SVFStart`): a training run builds the SVF model on meta, applies the layout,
  and each rank fills only its shards; only an owner reads a whole base matrix, one at a time.
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


def _cache_key(shapes: Dict[str, tuple], cfg: SVFConfig) -> str:
    blob = json.dumps({"targets": cfg.targets, "exclude": cfg.exclude, "shapes": {n: list(v) for n, v in shapes.items()}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class SVDCache:
    """The factors of one base checkpoint: directory `svd-<key>/` beside it, one safetensors file
    per matrix (written by the rank that decomposed it, so no rank ever holds all the factors) and
    `index.json`, written last by rank 0 once every file is there: a directory without it is an
    interrupted run's and is recomputed. Every rank must see the directory (as it sees init.from)."""

    def __init__(self, cache_dir: Path | None, key: str):
        self.dir = Path(cache_dir) / f"svd-{key}" if cache_dir is not None else None

    def complete(self, names: List[str]) -> bool:
        if self.dir is None or not (self.dir / "index.json").exists():
            return False
        return json.loads((self.dir / "index.json").read_text()).get("names") == names

    def read(self, name: str) -> tuple:
        from safetensors import safe_open

        with safe_open(str(self.dir / f"{name}.safetensors"), framework="pt") as f:
            try:
                return f.get_tensor("U"), f.get_tensor("s"), f.get_tensor("Vh")
            except Exception:
                raise ValueError(f"SVD cache {self.dir} holds no factors for {name}; delete it to recompute") from None

    def write(self, name: str, factors: tuple) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{name}.tmp"
        save_file({k: t.detach().contiguous().cpu() for k, t in zip(("U", "s", "Vh"), factors)}, str(tmp))
        tmp.replace(self.dir / f"{name}.safetensors")

    def finish(self, names: List[str]) -> None:
        tmp = self.dir / "index.tmp"
        tmp.write_text(json.dumps({"names": names}))
        tmp.replace(self.dir / "index.json")


def _check_factors(cache: SVDCache, name: str, factors: tuple, weight: torch.Tensor) -> None:
    """The cache belongs to one set of base weights: its first matrix must reproduce the base's."""
    U, s, Vh = (t.double() for t in factors)
    w = weight.detach().double().cpu()
    err = ((U.cpu() * s.cpu()) @ Vh.cpu() - w).norm() / w.norm().clamp_min(1e-30)
    if err > 1e-4:
        raise ValueError(f"SVD cache {cache.dir} does not reproduce the base weight {name} "
                         f"(relative error {err:.2e}); delete it to recompute")


def iter_factors(names: List[str], shapes: Dict[str, tuple], weight_of: Callable[[str], torch.Tensor],
                 cache: SVDCache, rank: int = 0, world: int = 1, group=None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Yield (name, (U, s, V^T)) for each matrix in order, one at a time, identical on every rank.

    From the cache when it is complete (every rank reads it); otherwise rank i decomposes
    names[i::world], asking `weight_of(name)` for that whole matrix only, writes it to the cache
    and broadcasts it from there. A rank holds at most one matrix and its factors at a time.
    Sets `cache.hit` to whether the cache was read."""
    cache.hit = cache.complete(names)
    if cache.hit:
        for i, n in enumerate(names):
            factors = cache.read(n)
            if i == 0:
                _check_factors(cache, n, factors, weight_of(n))
            yield n, tuple(t.to(device=device, dtype=dtype) for t in factors)
        return
    import torch.distributed as dist

    for i, n in enumerate(names):
        owner = i % world
        if owner == rank:
            factors = svd_factors(weight_of(n).to(device=device, dtype=dtype))
            if cache.dir is not None:
                cache.write(n, factors)
        else:
            out, inp = shapes[n]
            r = min(out, inp)
            factors = tuple(torch.empty(sh, dtype=dtype, device=device) for sh in ((out, r), (r,), (r, inp)))
        if world > 1:
            src = dist.get_global_rank(group, owner) if group is not None else owner
            for t in factors:
                dist.broadcast(t, src=src, group=group)
        yield n, factors
    if cache.dir is not None:
        if world > 1:
            dist.barrier(group=group)
        if rank == 0:
            cache.finish(names)


def _shapes(model: nn.Module, names: List[str]) -> Dict[str, tuple]:
    return {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in names}


def compute_factors(model: nn.Module, names: List[str], rank: int = 0, world: int = 1,
                    group=None) -> Dict[str, tuple]:
    """(U, s, V^T) for each named nn.Linear: rank i decomposes names[i::world], then each result
    is broadcast from its owner (with world > 1 a process group must be initialised)."""
    w0 = model.get_submodule(names[0]).weight
    return dict(iter_factors(names, _shapes(model, names), lambda n: model.get_submodule(n).weight,
                             SVDCache(None, ""), rank, world, group, w0.dtype, w0.device))


def prepare_svf(model: nn.Module, cfg: SVFConfig, cache_dir: Path | None = None,
                rank: int = 0, world: int = 1, group=None) -> List[str]:
    """Decompose the selected matrices of a whole (not sharded) model, reading or writing the SVD
    cache in `cache_dir`, and turn `model` into its SVF form in place. Returns the decomposed
    names. A training run uses the sharded start instead (`svf_init_fn`); both share the cache."""
    names = svf_targets(model, cfg)
    if not names:
        apply_svf(model, cfg)  # raises with the names that exist
    shapes = _shapes(model, names)
    cache = SVDCache(cache_dir, _cache_key(shapes, cfg))
    w0 = model.get_submodule(names[0]).weight
    factors = dict(iter_factors(names, shapes, lambda n: model.get_submodule(n).weight, cache, rank, world, group,
                                w0.dtype, w0.device))
    return apply_svf(model, cfg, factors)


class SVFStart:
    """`parallelize(..., init_fn=SVFStart(...))` for an SVF model built on meta (`apply_svf` on a
    meta model): the sharded start of fine-tuning. After the layout is applied it

    1. allocates this rank's shards and fills every tensor but the SVF factors as a sharded start
       does (parallel/init.py), then overwrites the parameters with init.from's (trainer/init_from.py);
    2. fills U, s, V^T matrix by matrix from `iter_factors`: the owner of a matrix reads that one
       whole base matrix from init.from (or draws it from the seed), decomposes it, caches and
       broadcasts its factors; each rank keeps only its part (`fill_from_full`). Peak memory is
       the shards plus one matrix and its factors, never the model;
    3. sets z to 1, or to finetune.z_from's vectors.

    After the call: `names` (the decomposed matrices), `matrices_read` (the whole base matrices this
    rank read: its share of the decomposition, or on a cache hit the one that checks the cache),
    `cache_hit`, `cache_dir`."""

    def __init__(self, job, device: torch.device, rank: int = 0, world: int = 1, group=None, log: bool = False):
        import os

        from titanforge.parallel.init import seed_source
        from titanforge.trainer.init_from import weight_source

        self.job, self.device, self.rank, self.world, self.group, self.log = job, device, rank, world, group, log
        self.src = (getattr(job, "init", None) or {}).get("from")
        self.source = weight_source(self.src, job.model) if self.src else seed_source(job.model, job.train.seed)
        self.cache_dir = Path(self.src) if self.src and Path(self.src).is_dir() and os.access(self.src, os.W_OK) else None
        self.z_init = read_z(job.finetune.z_from) if job.finetune.z_from else None
        self.names: List[str] = []
        self.matrices_read: List[str] = []
        self.cache_hit = False

    def _base_weight(self, name: str) -> torch.Tensor:
        w = self.source(f"{name}.weight")
        if w is None:
            raise ValueError(f"init.from={self.src} has no tensor for {name}.weight, which finetune.svf.targets "
                             f"selects; is it a checkpoint of this model?")
        self.matrices_read.append(name)
        return w

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> nn.Module:
        import time

        from titanforge.parallel.init import fill_from_full, init_model_weights, plain_name, to_empty_keeping_hooks
        from titanforge.trainer.init_from import load_model_weights

        svf = {plain_name(n): m for n, m in model.named_modules() if isinstance(m, SVFLinear)}
        own = frozenset(f"{n}.{k}" for n in svf for k in ("U", "s", "Vh", "z"))
        if self.z_init is not None and set(self.z_init) != set(svf):
            raise ValueError(f"finetune.z_from={self.job.finetune.z_from}: its z-vectors do not match the model's SVF "
                             f"matrices (missing {sorted(set(svf) - set(self.z_init))[:3]}, unexpected "
                             f"{sorted(set(self.z_init) - set(svf))[:3]}); were they trained with the same "
                             f"finetune.targets?")
        to_empty_keeping_hooks(model, self.device)  # keeps tensor parallelism's gradient hooks
        init_model_weights(model, self.job.model, self.job.train.seed, exempt=own)
        if self.src:
            load_model_weights(model, self.source, self.src, skip=own)
        self.names = list(svf)
        shapes = {n: (m.out_features, m.in_features) for n, m in svf.items()}
        ft = self.job.finetune
        cache = SVDCache(self.cache_dir, _cache_key(shapes, SVFConfig(list(ft.targets), list(ft.exclude))))
        dtype = next(iter(svf.values())).z.dtype
        t0 = time.perf_counter()
        for name, (U, s, Vh) in iter_factors(self.names, shapes, self._base_weight, cache, self.rank, self.world,
                                             self.group, dtype, self.device):
            m = svf[name]
            for target, full in ((m.U, U), (m.s, s), (m.Vh, Vh)):
                fill_from_full(target, full)
            z = self.z_init[name] if self.z_init is not None else torch.ones(m.z.shape)
            if tuple(z.shape) != tuple(m.z.shape):
                raise ValueError(f"finetune.z_from: z-vector {name} has shape {tuple(z.shape)}, the model's is "
                                 f"{tuple(m.z.shape)}")
            fill_from_full(m.z, z.to(device=self.device, dtype=dtype))
        self.cache_hit = cache.hit
        if self.log:
            where = f"cached in {cache.dir}" if cache.dir is not None else "not cached (init.from is not a writable directory)"
            if cache.hit:
                print(f"[svf] SVD of {len(self.names)} matrices read from the cache {cache.dir}", flush=True)
            else:
                print(f"[svf] SVD of {len(self.names)} matrices computed over {self.world} ranks in "
                      f"{time.perf_counter() - t0:.1f} s, {where}", flush=True)
        return model


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


__all__ = ["SVDCache", "SVFLinear", "SVFStart", "adapt_few_shot", "base_policy", "cem_search", "classify_task", "compute_factors", "iter_factors", "prepare_svf", "read_z",
           "reinforce_loss", "sample_answer", "save_z", "trainable_summary"]

