"""Long-context task generators (data/tasks): seeded, answers where they say, scored on answers only.

The tokenizer is the data tests' local byte-level BPE (bpe:300, no downloads), the haystack its
prepared text. The scorer is trainer/evaluate.py's, fed by stand-in models: an oracle that
returns the true next token everywhere must score 100%; a constant answer must score chance
(within 4 binomial standard deviations over a few hundred answers).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from titanforge.data import read_manifest
from titanforge.data.tasks import TaskError, TaskMixConfig, TaskMixture, build_task, corpus_tokens, task_tokenizer
from titanforge.data.tasks.generators import ACTORS, LOCATIONS
from titanforge.trainer.evaluate import evaluate_model, make_samples, score_samples

SPECS = ["passkey", "passkey:digits=1", "niah_number:digits=3", "niah_word", "mqar:pairs=5,values=8",
         "babilong:facts=5"]


@pytest.fixture(scope="module")
def kit(prepared):
    encode, vocab = task_tokenizer(prepared)
    tok = __import__("titanforge.data.tokenizer", fromlist=["load_tokenizer"]).load_tokenizer(read_manifest(prepared))
    return encode, vocab, corpus_tokens(prepared, "train"), tok


def task_of(kit, spec):
    encode, vocab, haystack, _ = kit
    return build_task(spec, encode, vocab, haystack)


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic_per_seed_and_exact_length(kit, spec):
    task = task_of(kit, spec)
    for length in (task.min_length(), task.min_length() + 37, task.min_length() + 150):
        a = task.sample(np.random.default_rng(7), length, 0.3)
        b = task.sample(np.random.default_rng(7), length, 0.3)
        c = task.sample(np.random.default_rng(8), length, 0.3)
        assert len(a.tokens) == length and a.tokens.dtype == np.int64
        assert np.array_equal(a.tokens, b.tokens) and a.spans == b.spans and a.depths == b.depths
        assert not np.array_equal(a.tokens, c.tokens)
        assert all(1 <= s < e <= length for s, e in a.spans) and len(a.depths) == len(a.spans)
        mask = a.loss_mask()
        assert mask.sum() == sum(e - s for s, e in a.spans) and all(mask[s - 1:e - 1].all() for s, e in a.spans)
    # Two builds of the same spec generate the same samples (nothing hidden in the instance).
    L = task.min_length() + 37
    again = task_of(kit, spec).sample(np.random.default_rng(7), L, 0.3)
    assert np.array_equal(again.tokens, task.sample(np.random.default_rng(7), L, 0.3).tokens)


def _find(hay: np.ndarray, needle: np.ndarray) -> list[int]:
    n = len(needle)
    return [i for i in range(len(hay) - n + 1) if np.array_equal(hay[i:i + n], needle)]


@pytest.mark.parametrize("spec", ["passkey", "niah_number:digits=4", "niah_word"])
def test_needle_answer_is_the_hidden_one_at_its_depth(kit, spec):
    task = task_of(kit, spec)
    for seed, depth in enumerate((0.0, 0.2, 0.5, 0.8, 1.0)):
        L = task.min_length() + 300
        s = task.sample(np.random.default_rng(seed), L, depth)
        (a, e), = s.spans
        assert e == L and s.depths == [depth]
        answer = s.tokens[a:e]
        where = _find(s.tokens[:a], np.concatenate([task.pre, answer]))
        assert len(where) == 1, (spec, seed)
        # The needle starts at the requested depth of the context, moved at most to a sentence start.
        n_ctx = a - len(task.question) - (len(task.pre) + len(task.mid) + len(task.post) + len(answer) *
                                          (2 if task.kind == "passkey" else 1))
        assert abs(where[0] - depth * n_ctx) <= 24, (where, depth * n_ctx)
        assert np.array_equal(s.tokens[a - len(task.question):a], task.question)


def test_mqar_answer_is_the_value_paired_with_the_key(kit):
    task = task_of(kit, "mqar:pairs=6,queries=4,keys=20,values=10,noise=30")
    for seed in range(5):
        s = task.sample(np.random.default_rng(seed), 120)
        assert len(s.spans) == 4
        for (a, e), depth in zip(s.spans, s.depths):
            key = s.tokens[a - 1]
            assert key in task.key_ids and s.tokens[a] in task.value_ids
            pair = [i for i in range(a - 1) if s.tokens[i] == key]
            assert len(pair) == 1 and s.tokens[pair[0] + 1] == s.tokens[a]
            assert abs(pair[0] / (120 - 8) - depth) < 0.05
        ctx = s.tokens[:120 - 8]
        assert np.isin(ctx, np.concatenate([task.key_ids, task.value_ids, task.noise_ids])).all()


def test_babilong_answer_is_the_actors_last_location(kit):
    _, _, _, tok = kit
    task = task_of(kit, "babilong:facts=6")
    for seed in range(8):
        s = task.sample(np.random.default_rng(seed), task.min_length() + 300, 0.5)
        (a, e), = s.spans
        text = tok.decode(s.tokens[:a])
        actor = re.search(r"Where is (\w+)\? Answer: the$", text).group(1)
        moves = re.findall(rf"\b{actor} (?:went|moved|journeyed|travelled) to the (\w+)\.", text)
        assert moves and tok.decode(s.tokens[a:e]).strip() == moves[-1] and moves[-1] in LOCATIONS
        assert actor in ACTORS


class Oracle(torch.nn.Module):
    """Logits one-hot on the true next token of whichever sample it is shown."""

    def __init__(self, samples, vocab):
        super().__init__()
        self.next = {s.tokens[:-1].tobytes(): s.tokens[1:] for _, s in samples}
        self.vocab = vocab

    def forward(self, tokens):
        out = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens.numpy()):
            out[b, torch.arange(len(row)), torch.from_numpy(self.next[row.tobytes()])] = 1.0
        return out


class ConstantAnswer(torch.nn.Module):
    """Always gives the same answer: `answer` (tokens) right-aligned at the end, `token` elsewhere."""

    def __init__(self, vocab, token, answer=()):
        super().__init__()
        self.vocab, self.token, self.answer = vocab, token, list(answer)

    def forward(self, tokens):
        B, T = tokens.shape
        ids = torch.full((B, T), self.token)
        if self.answer:
            ids[:, T - len(self.answer):] = torch.tensor(self.answer)
        return torch.nn.functional.one_hot(ids, self.vocab).float()


@pytest.mark.parametrize("spec", SPECS)
def test_oracle_scores_everything(kit, spec):
    task = task_of(kit, spec)
    samples = make_samples(task, [task.min_length() + 5, task.min_length() + 60], 3, 4, seed=0)
    right, logp = score_samples(Oracle(samples, kit[1]), samples, batch_size=3, device="cpu")
    assert len(right) == sum(len(s.spans) for _, s in samples) and right.all()


@pytest.mark.parametrize("spec", ["passkey:digits=1", "niah_word", "mqar:pairs=4,values=8", "babilong"])
def test_constant_answer_scores_chance(kit, spec):
    task = task_of(kit, spec)
    vocab = kit[1]
    if task.name.startswith("mqar"):
        model = ConstantAnswer(vocab, int(task.value_ids[3]))
    elif task.name == "babilong":
        model = ConstantAnswer(vocab, 0, task.answer["garden"])
    elif task.name == "niah_word":
        model = ConstantAnswer(vocab, 0, task.answers[5])
    else:
        model = ConstantAnswer(vocab, int(task.digits[7][0]))
    res = evaluate_model(model, [task], lengths=[max(64, task.min_length())], depths=4, samples=120, batch_size=40,
                         seed=3, device="cpu")[task.name]
    n = res.total.sum()
    sigma = math.sqrt(task.chance * (1 - task.chance) / n)
    assert n >= 480 and abs(res.overall - task.chance) <= 4 * sigma, (res.overall, task.chance, n)


def test_bad_specs_name_the_fix(kit):
    encode, vocab, hay, _ = kit
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        build_task("nope", encode, vocab, hay)
    with pytest.raises(TaskError, match="unknown parameter"):
        build_task("passkey:pairs=3", encode, vocab, hay)
    with pytest.raises(TaskError, match="key=integer"):
        build_task("mqar:pairs", encode, vocab, hay)
    with pytest.raises(TaskError, match="exceed the vocabulary"):
        build_task("mqar:keys=200,values=200", encode, vocab, hay)
    with pytest.raises(TaskError, match="below its minimum"):
        build_task("passkey", encode, vocab, hay).sample(np.random.default_rng(0), 10)


class _Rows:
    """A stand-in train loader: corpus rows with source ids, like TrainLoader's batches."""

    def __init__(self, L):
        self.L, self.epoch, self.n = L, 0, 0
        self.gen = torch.Generator().manual_seed(0)

    def __next__(self):
        ids = torch.arange(self.n, self.n + 6)
        self.n += 6
        return {"tokens": torch.randint(0, 100, (6, self.L), generator=self.gen), "index": ids}


def test_mixture_replaces_rows_with_answer_masks_deterministically(kit):
    encode, vocab, hay, _ = kit
    tasks = [build_task(s, encode, vocab, hay) for s in ("passkey:digits=2", "mqar:pairs=3")]
    cfg = TaskMixConfig(names=["passkey:digits=2", "mqar:pairs=3"], fraction=0.5)
    one, two = TaskMixture(_Rows(200), cfg, tasks, seed=5), TaskMixture(_Rows(200), cfg, tasks, seed=5)
    replaced = 0
    for _ in range(6):
        a, b = next(one), next(two)
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        for row, m in zip(a["tokens"], a["loss_mask"]):
            if not m.all():
                replaced += 1
                assert 1 <= m.sum() <= 4 and m[-1]  # the answer only; passkey's is at the very end
    assert 10 <= replaced <= 26 and one.task_rows == replaced  # 36 rows at fraction 0.5
    full = TaskMixture(_Rows(200), TaskMixConfig(names=["passkey"], answer_only_loss=False), tasks[:1], seed=5)
    assert next(full)["loss_mask"].all()
