"""Long-context evaluation: accuracy on the answer tokens by sequence length and needle depth.

    results = evaluate_model(model, tasks, lengths=[256, 512], depths=5, samples=8, ...)
    results["passkey"].accuracy        # [len(lengths), depths], NaN where a cell has no answers
    print(results["passkey"].table()); results["passkey"].write(out_dir)   # JSON + heat-map PNG

The samples of a suite are a fixed function of (seed, suite, length, depth, index): every
evaluation, on any number of processes, sees the same sequences. They are cut into batches of
one length, batch b going to data-parallel rank b mod dp; every rank runs the same number of
forwards (the short ones repeat a batch and drop its answers) so sharded models stay in step.
Per-answer results are summed over ranks, so 1 and N processes give the same numbers (equal
batches give equal logits). An answer counts as right when the greedy (argmax) prediction of
every answer token, teacher-forced, equals it; `logprob` is the mean log-probability of the
answers, a finer number than accuracy to compare runs with.

`Evaluator` runs the `eval.*` suites inside training; `evaluate_checkpoint` serves
`titanforge eval` (launch/eval.py), loading a saved checkpoint into a plain model per process.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from titanforge.data.tasks import Task, depth_bin, depth_grid
from titanforge.data.tasks.mixture import corpus_tokens, task_tokenizer
from titanforge.data.tasks.generators import build_task
from titanforge.trainer.dist import DistInfo, all_reduce
from titanforge.trainer.heatmap import png_bytes, heatmap


@dataclass
class SuiteResult:
    suite: str
    lengths: list[int]
    depths: list[float]
    correct: np.ndarray                     # [n_lengths, n_depths] right answers
    total: np.ndarray                       # [n_lengths, n_depths] answers
    logprob: float                          # mean answer log-probability
    chance: float
    extra: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.total > 0, self.correct / np.maximum(self.total, 1), np.nan)

    @property
    def overall(self) -> float:
        return float(self.correct.sum() / max(1, self.total.sum()))

    def by_length(self) -> dict[int, float]:
        """Accuracy per length; NaN for a length below the task's minimum (no samples)."""
        return {L: float(c.sum() / t.sum()) if t.sum() else float("nan")
                for L, c, t in zip(self.lengths, self.correct, self.total)}

    def to_dict(self) -> dict:
        acc = self.accuracy
        return {"suite": self.suite, "lengths": self.lengths, "depths": self.depths, "chance": self.chance,
                "accuracy": self.overall, "logprob": self.logprob,
                "by_length": {str(k): None if math.isnan(v) else v for k, v in self.by_length().items()},
                "grid": [[None if math.isnan(v) else float(v) for v in row] for row in acc],
                "correct": self.correct.astype(int).tolist(), "total": self.total.astype(int).tolist(),
                **self.extra}

    def table(self) -> str:
        """Rows: lengths; columns: depths then the row's accuracy (percent)."""
        head = f"{self.suite} (chance {100 * self.chance:.1f}%) | " + " ".join(
            f"d={d:.2f}" for d in self.depths) + " |   all"
        lines = [head]
        for L, row, acc in zip(self.lengths, self.accuracy, self.by_length().values()):
            cells = " ".join("     -" if math.isnan(v) else f"{100 * v:6.1f}" for v in row)
            lines.append(f"{'L=' + str(L):>{len(head.split('|')[0]) - 1}} | {cells} | "
                         + ("    -" if math.isnan(acc) else f"{100 * acc:5.1f}"))
        lines.append(f"overall {100 * self.overall:.1f}% | answer logprob {self.logprob:.4f}")
        return "\n".join(lines)

    def png(self) -> bytes:
        return png_bytes(heatmap(self.accuracy, [str(L) for L in self.lengths],
                                 [str(int(round(100 * d))) for d in self.depths]))

    def write(self, out_dir: str | Path, stem: str | None = None) -> tuple[Path, Path]:
        """eval_<suite>.json and eval_<suite>.png in out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or "eval_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in self.suite)
        js, im = out / f"{stem}.json", out / f"{stem}.png"
        js.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        im.write_bytes(self.png())
        return js, im


def make_samples(task: Task, lengths: list[int], depths: int, samples: int, seed: int) -> list:
    """[(length index, Sample)], grouped by length; a fixed function of the arguments. Lengths
    below the task's minimum (its needle, question and answer) get no samples."""
    out = []
    tag = zlib.crc32(task.name.encode())
    for li, L in enumerate(lengths):
        if L < task.min_length():
            continue
        for di, d in enumerate(depth_grid(depths)):
            for j in range(samples):
                rng = np.random.default_rng([seed, tag, L, di, j])
                out.append((li, task.sample(rng, L, d if task.placed else None)))
    return out


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    full = getattr(logits, "full_tensor", None)  # a vocab-sharded DTensor under tensor parallelism
    return (full() if full is not None else logits).float()


@torch.no_grad()
def score_samples(model, samples: list, *, batch_size: int, device, dp_rank: int = 0, dp_size: int = 1,
                  replicas: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(right [n_answers], logprob [n_answers]) over all samples' answer spans, in order, summed
    over ranks; `replicas` ranks (tensor-parallel peers) compute each batch and are divided out."""
    starts = np.cumsum([0] + [len(s.spans) for _, s in samples])
    batches, i = [], 0
    while i < len(samples):
        j = i
        while j < len(samples) and j - i < batch_size and len(samples[j][1].tokens) == len(samples[i][1].tokens):
            j += 1
        batches.append(range(i, j))
        i = j
    right = torch.zeros(int(starts[-1]), dtype=torch.float64, device=device)
    logp = torch.zeros_like(right)
    rounds = -(-len(batches) // dp_size)
    for r in range(rounds):
        b = r * dp_size + dp_rank
        keep = b < len(batches)
        idx = batches[b if keep else 0]
        tokens = torch.from_numpy(np.stack([samples[k][1].tokens for k in idx])).to(device)
        lp = torch.log_softmax(_logits(model, tokens[:, :-1]), dim=-1)
        if not keep:
            continue
        pred = lp.argmax(-1)
        for row, k in enumerate(idx):
            for a, (s, e) in enumerate(samples[k][1].spans):
                tgt = tokens[row, s:e]
                right[starts[k] + a] = float(bool((pred[row, s - 1:e - 1] == tgt).all()))
                logp[starts[k] + a] = lp[row, s - 1:e - 1].gather(-1, tgt[:, None]).sum().double()
    stats = all_reduce(torch.stack([right, logp])) / replicas
    return stats[0].cpu().numpy(), stats[1].cpu().numpy()


def summarize(task: Task, lengths: list[int], depths: int, samples: list, right: np.ndarray,
              logp: np.ndarray) -> SuiteResult:
    correct = np.zeros((len(lengths), depths))
    total = np.zeros_like(correct)
    a = 0
    for li, s in samples:
        for d in s.depths:
            b = depth_bin(d, depths)
            correct[li, b] += right[a]
            total[li, b] += 1
            a += 1
    return SuiteResult(task.name, list(lengths), depth_grid(depths), np.round(correct), total,
                       float(logp.mean()) if len(logp) else float("nan"), task.chance)


def evaluate_model(model, tasks: list[Task], *, lengths: list[int], depths: int, samples: int, batch_size: int,
                   seed: int, device, dp_rank: int = 0, dp_size: int = 1, replicas: int = 1,
                   cache: dict | None = None) -> dict[str, SuiteResult]:
    results = {}
    for task in tasks:
        key = (task.name, tuple(lengths), depths, samples, seed)
        if cache is not None and key in cache:
            made = cache[key]
        else:
            made = make_samples(task, lengths, depths, samples, seed)
            if cache is not None:
                cache[key] = made
        right, logp = score_samples(model, made, batch_size=batch_size, device=device, dp_rank=dp_rank,
                                    dp_size=dp_size, replicas=replicas)
        results[task.name] = summarize(task, lengths, depths, made, right, logp)
    return results


def build_suites(specs: list[str], data_path: str) -> list[Task]:
    """The suites' generators, on the tokenizer of the data and its val split as the haystack."""
    encode, vocab = task_tokenizer(data_path)
    needs_text = any(s.split(":")[0] in ("niah_number", "niah_word", "babilong") for s in specs)
    haystack = corpus_tokens(data_path, "val") if needs_text else None
    return [build_task(s, encode, vocab, haystack) for s in specs]


def metrics_of(results: dict[str, SuiteResult]) -> dict[str, float]:
    out = {}
    for name, r in results.items():
        out[f"eval/{name}/accuracy"] = r.overall
        out[f"eval/{name}/logprob"] = r.logprob
        for L, acc in r.by_length().items():
            if not math.isnan(acc):
                out[f"eval/{name}/len_{L}"] = acc
    return out


def log_images(tracker, step: int, results: dict[str, SuiteResult]) -> None:
    """Heat maps to W&B as HTML (wandb.Image needs PIL, which this environment lacks)."""
    run = getattr(tracker, "run", None)
    if run is None:
        return
    import wandb

    run.log({f"eval/{name}/heatmap": wandb.Html(
        f'<img src="data:image/png;base64,{base64.b64encode(r.png()).decode()}" alt="{name}">')
        for name, r in results.items()}, step=step)


class Evaluator:
    """The `eval.*` suites inside training: the same samples at every evaluation."""

    def __init__(self, cfg, tasks: list[Task], lengths: list[int], info: DistInfo, dp_rank: int, dp_size: int):
        self.cfg, self.tasks, self.lengths, self.info = cfg, tasks, lengths, info
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.cache: dict = {}

    @classmethod
    def from_job(cls, job, info: DistInfo, dp_rank: int, dp_size: int) -> "Evaluator":
        from titanforge.data import read_manifest

        lengths = list(job.eval.lengths) or [read_manifest(job.data.path)["seq_len"]]
        return cls(job.eval, build_suites(list(job.eval.suites), job.data.path), lengths, info, dp_rank, dp_size)

    def run(self, model, step: int, tracker, out_dir: Path) -> dict[str, SuiteResult]:
        c = self.cfg
        results = evaluate_model(model, self.tasks, lengths=self.lengths, depths=c.depths, samples=c.samples,
                                 batch_size=c.batch_size, seed=c.seed, device=self.info.device,
                                 dp_rank=self.dp_rank, dp_size=self.dp_size,
                                 replicas=self.info.world_size // self.dp_size, cache=self.cache)
        if self.info.is_main:
            for r in results.values():
                print(f"[eval] step {step} | " + r.table().replace("\n", "\n[eval] "), flush=True)
                r.write(Path(out_dir) / f"step_{step:08d}")
            tracker.log(step, metrics_of(results))
            log_images(tracker, step, results)
        return results


def load_model(job, ckpt: Path, device) -> torch.nn.Module:
    """The plain model with the weights of a DCP checkpoint (any layout it was saved from)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from titanforge.trainer.checkpoint import CheckpointError, verify
    from titanforge.trainer.step import build_plain_model

    verify(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta.get("format", "dcp") != "dcp":
        raise CheckpointError(f"{ckpt} is a {meta['format']} checkpoint; eval reads DCP checkpoints (train "
                              f"with parallel.dp_backend=ddp or fsdp)")
    model = build_plain_model(job, device)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict(state["model"])
    model.eval()
    return model


def resolve_checkpoint(path: str | Path) -> Path:
    """A step_N directory, or a run / checkpoints directory (its newest complete checkpoint)."""
    from titanforge.trainer.checkpoint import complete_checkpoints

    p = Path(path)
    if (p / "checksums.json").exists() or (p / "meta.json").exists():
        return p
    for root in (p, p / "checkpoints"):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise FileNotFoundError(f"{p} is not a checkpoint (step_N directory) nor a run directory holding one; "
                            f"pass e.g. runs/llama-tiny/checkpoints/step_00000030")


def evaluate_checkpoint(job, ckpt: Path, specs: list[str], *, lengths: list[int], depths: int, samples: int,
                        batch_size: int, seed: int, info: DistInfo) -> dict[str, SuiteResult]:
    """`titanforge eval`: every process loads the whole model and takes its share of the batches."""
    model = load_model(job, ckpt, info.device)
    tasks = build_suites(specs, job.data.path)
    return evaluate_model(model, tasks, lengths=lengths, depths=depths, samples=samples, batch_size=batch_size,
                          seed=seed, device=info.device, dp_rank=info.rank, dp_size=info.world_size)
