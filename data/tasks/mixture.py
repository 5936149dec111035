"""The training task mixture, and the corpus as a haystack for the natural-text tasks.

`TaskMixture` wraps the train loader: each row is replaced, with probability `fraction`, by a
sample of one of the tasks, drawn from a generator seeded by (seed, the row's source id, the
epoch), so the mixture is deterministic, the same on every rank layout, and resumes exactly with
the loader's own state. Batches gain `loss_mask` [B, seq_len] (True = the target counts): all
True for corpus rows, the answer tokens only for task rows when `answer_only_loss`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from titanforge.data.shards import read_manifest, read_shard
from titanforge.data.tasks.config import TaskMixConfig
from titanforge.data.tasks.generators import Task, TaskError, build_task
from titanforge.data.tokenizer import load_tokenizer


def corpus_tokens(data_path: str | Path, split: str = "val", max_tokens: int = 1 << 21) -> np.ndarray:
    """The prepared split as one token stream (rows in source order, overlaps dropped), at most
    `max_tokens` tokens: the natural text the needle tasks hide their facts in."""
    manifest = read_manifest(data_path)
    rows, ids = [], []
    n = 0
    for entry in manifest["splits"][split]["shards"]:
        r, i = read_shard(Path(manifest["root"]), entry, manifest["sample_len"], manifest["dtype"])
        rows.append(r[:, :-1])
        ids.append(i)
        n += r.size
        if n >= 2 * max_tokens:
            break
    if not rows:
        raise TaskError(f"{manifest['root']} has no {split} rows to use as a haystack; prepare with "
                        f"--val-fraction > 0")
    rows, ids = np.concatenate(rows), np.concatenate(ids)
    return rows[np.argsort(ids, kind="stable")].reshape(-1)[:max_tokens].astype(np.int64)


def task_tokenizer(data_path: str | Path):
    """(encode(text) -> ids, vocab_size) of the tokenizer the data was prepared with."""
    tok = load_tokenizer(read_manifest(data_path))
    return (lambda text: tok.encode_documents([text])[0]), tok.vocab_size


def build_tasks(cfg: TaskMixConfig, data_path: str | Path, split: str) -> list[Task]:
    encode, vocab = task_tokenizer(data_path)
    needs_text = any(n.split(":")[0] in ("niah_number", "niah_word", "babilong") for n in cfg.names)
    haystack = corpus_tokens(data_path, split) if needs_text else None
    return [build_task(n, encode, vocab, haystack) for n in cfg.names]


def check_mixture(cfg: TaskMixConfig) -> list[str]:
    errs = []
    if cfg.weights and len(cfg.weights) != len(cfg.names):
        errs.append(f"data.tasks.weights has {len(cfg.weights)} entries for {len(cfg.names)} tasks; give one "
                    f"weight per task or none")
    if any(w < 0 for w in cfg.weights) or (cfg.weights and sum(cfg.weights) <= 0):
        errs.append("data.tasks.weights must be >= 0 with a positive sum")
    if not 0.0 <= cfg.fraction <= 1.0:
        errs.append(f"data.tasks.fraction={cfg.fraction} must be in [0, 1]")
    return errs


class TaskMixture:
    """An iterator of batches like the TrainLoader's, with task rows mixed in and `loss_mask`."""

    def __init__(self, loader, cfg: TaskMixConfig, tasks: list[Task], seed: int):
        errs = check_mixture(cfg)
        if errs:
            raise TaskError("; ".join(errs))
        self.loader, self.cfg, self.tasks, self.seed = loader, cfg, tasks, seed
        w = np.asarray(cfg.weights or [1.0] * len(tasks), dtype=np.float64)
        self.p = w / w.sum()
        self.task_rows = 0

    @property
    def stats(self) -> dict:
        """The wrapped loader's data-quality counters (corrupt shards, skipped samples)."""
        return self.loader.stats

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch = self.loader.epoch
        batch = next(self.loader)
        tokens = batch["tokens"].clone()
        B, L = tokens.shape
        mask = torch.ones(B, L - 1, dtype=torch.bool)
        for i, index in enumerate(batch["index"].tolist()):
            rng = np.random.default_rng([self.seed, epoch, int(index)])
            if rng.random() >= self.cfg.fraction:
                continue
            task = self.tasks[int(rng.choice(len(self.tasks), p=self.p))]
            sample = task.sample(rng, L)
            tokens[i] = torch.from_numpy(sample.tokens)
            if self.cfg.answer_only_loss and task.answer_only:
                mask[i] = torch.from_numpy(sample.loss_mask())
            self.task_rows += 1
        return {**batch, "tokens": tokens, "loss_mask": mask}

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()
