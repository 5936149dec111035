"""Seeded long-context task generators: S-NIAH (RULER), MQAR (Zoology) and BABILong-style facts.

Every generator builds one sequence of exactly `length` tokens directly in token ids (text pieces
are encoded separately and concatenated), so the length is exact and every answer's position is
known without searching. A `Sample` holds the tokens and the answer spans; a model is scored on
the answer tokens only: span (s, e) is right when the argmax of the logits at positions
s-1 .. e-2 equals tokens[s:e] (teacher forcing, as RULER's greedy decoding would read them).

    task = build_task("passkey", tokenizer, haystack)      # or "mqar:pairs=16,values=64", ...
    sample = task.sample(np.random.default_rng(0), length=512, depth=0.25)
    sample.tokens [length] int64, sample.spans [(start, end)], sample.depths [float per span]

The tasks, and where they differ from the papers:
- `passkey` (RULER S-NIAH-1, Mohtashami & Jaggi 2023): the passkey sentence in the repeated
  noise "The grass is green. The sky is blue. ..."; `digits` digits (default 5), each digit its
  own token, so the answer alphabet is exact and chance is 10^-digits.
- `niah_number`, `niah_word` (RULER S-NIAH-2/3 style): one "special magic number/word" sentence
  in natural text (the `haystack` token stream, the default corpus), question at the end.
  The word comes from a fixed list of 32 words (chance 1/32).
- `mqar` (Zoology, Arora et al. 2023): `pairs` key-value pairs, but scattered through noise
  tokens rather than packed at the start, then `queries` of them asked at the end, each a key
  followed by its value (the scored token). Keys, values and noise are disjoint token sets, so a
  key can only be answered from its pair. The depth of a query is where its pair was.
- `babilong` (BABILong qa1, Kuratov et al. 2024): `facts` "Mary went to the kitchen." sentences
  scattered through natural text, then "Where is X?": the answer is X's last location, the
  supporting fact placed at the requested depth (X's earlier facts before it). Chance 1/6.
Depth is the position of the evidence as a fraction of the context before the question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = ("apple", "river", "garden", "silver", "candle", "forest", "window", "dragon", "orange", "castle",
         "pepper", "rabbit", "mirror", "violin", "harbor", "pencil", "meadow", "lantern", "copper", "falcon",
         "marble", "thunder", "velvet", "anchor", "basket", "feather", "island", "jacket", "kettle", "ladder",
         "needle", "rocket")
ACTORS = ("Mary", "John", "Daniel", "Sandra")
LOCATIONS = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom")
VERBS = ("went to", "moved to", "journeyed to", "travelled to")


class TaskError(ValueError):
    """A task spec or size that cannot work; the message names the fix."""


@dataclass
class Sample:
    tokens: np.ndarray                      # int64 [length]
    spans: list[tuple[int, int]]            # answer token ranges [start, end), start >= 1
    depths: list[float] = field(default_factory=list)  # evidence position in [0, 1], one per span

    def loss_mask(self) -> np.ndarray:
        """bool [length - 1]: the targets (tokens[1:]) that are answer tokens."""
        mask = np.zeros(len(self.tokens) - 1, dtype=bool)
        for s, e in self.spans:
            mask[s - 1:e - 1] = True
        return mask


Encode = Callable[[str], list]


def _enc(encode: Encode, text: str) -> np.ndarray:
    return np.asarray(encode(text), dtype=np.int64)


class Task:
    """A generator: `sample(rng, length, depth=None)`; `chance` is the accuracy of a constant guess."""

    name: str = ""
    chance: float = 0.0
    # Whether the depth passed to sample() places the evidence (else depths come out random).
    placed: bool = True
    # Training on this task puts the loss on the answer tokens only.
    answer_only: bool = True

    def min_length(self) -> int:
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, length: int, depth: float | None = None) -> Sample:
        if length < self.min_length():
            raise TaskError(f"task {self.name}: length {length} is below its minimum {self.min_length()} tokens "
                            f"(needle, question and answer); ask for longer sequences or fewer pairs/facts")
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise TaskError(f"task {self.name}: depth {depth} must be in [0, 1]")
        return self._sample(rng, length, rng.random() if depth is None else float(depth))

    def _sample(self, rng, length: int, depth: float) -> Sample:
        raise NotImplementedError


def _filler(rng, haystack: np.ndarray | None, noise: np.ndarray | None, n: int) -> np.ndarray:
    """n tokens of context: a random window of the haystack, or the noise sentence repeated."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if noise is not None:
        reps = -(-n // len(noise)) + 1
        return np.tile(noise, reps)[:n]
    if len(haystack) < n:
        reps = -(-n // len(haystack))
        return np.tile(haystack, reps)[:n]
    start = int(rng.integers(0, len(haystack) - n + 1))
    return haystack[start:start + n].astype(np.int64)


def _insert(context: np.ndarray, pieces: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """context with each (position, tokens) inserted, positions in the original context's terms."""
    out, prev = [], 0
    for pos, toks in sorted(pieces, key=lambda p: p[0]):
        out += [context[prev:pos], toks]
        prev = pos
    out.append(context[prev:])
    return np.concatenate(out)


def _sentence_start(context: np.ndarray, pos: int, period: int, reach: int = 24) -> int:
    """The sentence start (just after a period) nearest to pos within `reach` tokens, else pos:
    RULER inserts needles between sentences."""
    lo, hi = max(1, pos - reach), min(len(context), pos + reach)
    ends = np.nonzero(context[lo - 1:hi] == period)[0] + lo
    ends = np.concatenate([ends, [x for x in (0, len(context)) if abs(x - pos) <= reach]]).astype(np.int64)
    return int(ends[np.argmin(np.abs(ends - pos))]) if len(ends) else pos


class NeedleTask(Task):
    """One needle in a context, a question, the answer at the very end (RULER S-NIAH)."""

    def __init__(self, name: str, encode: Encode, *, kind: str, haystack: np.ndarray | None,
                 digits: int = 5):
        self.name, self.kind, self.haystack = name, kind, haystack
        if kind == "passkey":
            self.noise = _enc(encode, NOISE)
            pre, mid, post = " The pass key is ", ". Remember it. ", " is the pass key."
            question = " What is the pass key? The pass key is "
        else:
            self.noise = None
            if haystack is None or len(haystack) == 0:
                raise TaskError(f"task {name} needs natural text (the corpus tokens) as its haystack")
            what = "number" if kind == "number" else "word"
            # Numbers follow "is " (each digit its own token); words carry their own leading space.
            space = " " if kind == "number" else ""
            pre, mid, post = f" One of the special magic {what}s is{space}", ".", ""
            question = (f" What is the special magic {what} mentioned in the provided text? "
                        f"The special magic {what} is{space}")
        self.pre, self.mid, self.post = _enc(encode, pre), _enc(encode, mid), _enc(encode, post)
        self.question = _enc(encode, question)
        self.period = int(_enc(encode, ".")[-1])
        if kind == "word":
            self.answers = [_enc(encode, " " + w) for w in WORDS]
            self.chance = 1.0 / len(WORDS)
        else:
            if digits < 1:
                raise TaskError(f"task {name}: digits={digits} must be >= 1")
            self.digits = [_enc(encode, str(d)) for d in range(10)]
            if any(len(d) != 1 for d in self.digits):
                raise TaskError(f"task {name}: the tokenizer does not encode every digit as one token")
            self.n_digits = digits
            self.chance = 10.0 ** -digits
        self.answer_len = max(len(a) for a in self.answers) if kind == "word" else digits

    def min_length(self) -> int:
        return len(self.pre) + len(self.mid) + len(self.post) + 2 * self.answer_len + len(self.question) + 8

    def _answer(self, rng) -> np.ndarray:
        if self.kind == "word":
            return self.answers[int(rng.integers(len(self.answers)))]
        # Any digit string, leading zeros included (RULER draws 7-digit numbers): one token a digit.
        return np.concatenate([self.digits[int(d)] for d in rng.integers(0, 10, self.n_digits)])

    def _sample(self, rng, length: int, depth: float) -> Sample:
        answer = self._answer(rng)
        if self.kind == "passkey":
            needle = np.concatenate([self.pre, answer, self.mid, answer, self.post])
        else:
            needle = np.concatenate([self.pre, answer, self.mid, self.post])
        n_ctx = length - len(needle) - len(self.question) - len(answer)
        context = _filler(rng, self.haystack, self.noise, n_ctx)
        pos = _sentence_start(context, int(round(depth * n_ctx)), self.period)
        tokens = np.concatenate([_insert(context, [(pos, needle)]), self.question, answer])
        return Sample(tokens, [(length - len(answer), length)], [depth])


class MQARTask(Task):
    """Multi-query associative recall with pairs scattered in noise (Zoology's MQAR, spread out)."""

    placed = False

    def __init__(self, name: str, vocab_size: int, *, pairs: int = 8, queries: int = 0, keys: int = 64,
                 values: int = 64, noise: int = 64, offset: int = 0):
        if pairs < 1 or keys < pairs or values < 2 or noise < 1:
            raise TaskError(f"task {name}: need pairs >= 1, keys >= pairs, values >= 2, noise >= 1 "
                            f"(got pairs={pairs} keys={keys} values={values} noise={noise})")
        self.queries = queries or pairs
        if self.queries > pairs:
            raise TaskError(f"task {name}: queries={self.queries} must be <= pairs={pairs}")
        # Three disjoint id ranges; offset skips the byte tokens of a BPE (digits, punctuation).
        offset = offset or min(256, max(0, vocab_size - keys - values - noise))
        if offset + keys + values + noise > vocab_size:
            raise TaskError(f"task {name}: keys + values + noise = {keys + values + noise} token ids from "
                            f"{offset} exceed the vocabulary ({vocab_size}); lower keys/values/noise")
        self.name, self.pairs = name, pairs
        self.key_ids = np.arange(offset, offset + keys)
        self.value_ids = np.arange(offset + keys, offset + keys + values)
        self.noise_ids = np.arange(offset + keys + values, offset + keys + values + noise)
        self.chance = 1.0 / values

    def min_length(self) -> int:
        return 2 * self.pairs + 2 * self.queries + 1

    def _sample(self, rng, length: int, depth: float) -> Sample:
        keys = rng.choice(self.key_ids, self.pairs, replace=False)
        vals = rng.choice(self.value_ids, self.pairs, replace=True)
        n_ctx = length - 2 * self.queries
        # Pair i occupies context slots [p_i, p_i + 2): choose pairs non-overlapping start slots.
        free = n_ctx - 2 * self.pairs
        starts = np.sort(rng.choice(free + 1, self.pairs, replace=True)) + 2 * np.arange(self.pairs)
        ctx = rng.choice(self.noise_ids, n_ctx).astype(np.int64)
        ctx[starts], ctx[starts + 1] = keys, vals
        asked = rng.choice(self.pairs, self.queries, replace=False)
        q = np.empty(2 * self.queries, dtype=np.int64)
        q[0::2], q[1::2] = keys[asked], vals[asked]
        tokens = np.concatenate([ctx, q])
        spans = [(n_ctx + 2 * j + 1, n_ctx + 2 * j + 2) for j in range(self.queries)]
        depths = [float(starts[i]) / max(1, free + 2 * (self.pairs - 1)) for i in asked]
        return Sample(tokens, spans, [min(1.0, d) for d in depths])


class BabiTask(Task):
    """BABILong qa1-style: where is X, after facts scattered through natural text."""

    def __init__(self, name: str, encode: Encode, haystack: np.ndarray, *, facts: int = 4):
        if haystack is None or len(haystack) == 0:
            raise TaskError(f"task {name} needs natural text (the corpus tokens) as its haystack")
        if facts < 1:
            raise TaskError(f"task {name}: facts={facts} must be >= 1")
        self.name, self.haystack, self.n_facts = name, haystack, facts
        self.fact = {(a, v, loc): _enc(encode, f" {a} {v} the {loc}.") for a in ACTORS for v in VERBS
                     for loc in LOCATIONS}
        self.question = {a: _enc(encode, f" Where is {a}? Answer: the") for a in ACTORS}
        self.answer = {loc: _enc(encode, " " + loc) for loc in LOCATIONS}
        self.chance = 1.0 / len(LOCATIONS)

    def min_length(self) -> int:
        longest = max(len(f) for f in self.fact.values())
        return self.n_facts * longest + max(len(q) for q in self.question.values()) + \
            max(len(a) for a in self.answer.values()) + 8

    def _sample(self, rng, length: int, depth: float) -> Sample:
        actor = ACTORS[int(rng.integers(len(ACTORS)))]
        # Facts in story order; the last fact about `actor` is the supporting one.
        n_before = int(rng.integers(0, self.n_facts))           # facts of anyone before the support
        story = []
        for _ in range(self.n_facts):
            a = ACTORS[int(rng.integers(len(ACTORS)))]
            story.append((a, VERBS[int(rng.integers(len(VERBS)))], LOCATIONS[int(rng.integers(len(LOCATIONS)))]))
        support = (actor, VERBS[int(rng.integers(len(VERBS)))], LOCATIONS[int(rng.integers(len(LOCATIONS)))])
        after = [f if f[0] != actor else (ACTORS[(ACTORS.index(actor) + 1) % len(ACTORS)],) + f[1:]
                 for f in story[n_before + 1:]]
        story = story[:n_before] + [support] + after
        pieces = [self.fact[f] for f in story]
        question, answer = self.question[actor], self.answer[support[2]]
        n_ctx = length - sum(len(p) for p in pieces) - len(question) - len(answer)
        context = _filler(rng, self.haystack, None, n_ctx)
        sup = int(round(depth * n_ctx))
        before = np.sort(rng.integers(0, sup + 1, n_before))
        later = np.sort(rng.integers(sup, n_ctx + 1, len(after)))
        positions = list(before) + [sup] + list(later)
        # Equal positions keep story order (_insert's sort is stable).
        tokens = np.concatenate([_insert(context, list(zip(positions, pieces))), question, answer])
        return Sample(tokens, [(length - len(answer), length)], [depth])


def parse_spec(spec: str) -> tuple[str, dict]:
    """'mqar:pairs=16,values=32' -> ('mqar', {'pairs': 16, 'values': 32})."""
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise TaskError(f"task spec {spec!r}: {item!r} is not key=integer (e.g. mqar:pairs=16)")
        kwargs[key.strip()] = int(value)
    return name.strip(), kwargs


TASKS = ("passkey", "niah_number", "niah_word", "mqar", "babilong")


def build_task(spec: str, encode: Encode, vocab_size: int, haystack: np.ndarray | None = None) -> Task:
    """A task from its spec `name[:key=value,...]`; `encode(text) -> ids` is the model's tokenizer,
    `haystack` a long token stream of natural text (needed by niah_number, niah_word, babilong)."""
    name, kw = parse_spec(spec)
    allowed = {"passkey": {"digits"}, "niah_number": {"digits"}, "niah_word": set(),
               "mqar": {"pairs", "queries", "keys", "values", "noise", "offset"}, "babilong": {"facts"}}
    if name not in allowed:
        raise TaskError(f"unknown task {name!r} in {spec!r}; tasks: {', '.join(TASKS)}")
    bad = set(kw) - allowed[name]
    if bad:
        raise TaskError(f"task {name}: unknown parameter(s) {sorted(bad)}; it takes {sorted(allowed[name]) or 'none'}")
    if name == "passkey":
        task = NeedleTask(spec, encode, kind="passkey", haystack=None, **kw)
    elif name in ("niah_number", "niah_word"):
        task = NeedleTask(spec, encode, kind=name[5:], haystack=haystack, **{"digits": 7, **kw})
    elif name == "mqar":
        task = MQARTask(spec, vocab_size, **kw)
    else:
        task = BabiTask(spec, encode, haystack, **kw)
    return task


def depth_grid(n: int) -> list[float]:
    """n evenly spaced depths from 0 to 1 (one depth, 0.5, when n == 1)."""
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def depth_bin(depth: float, n: int) -> int:
    return 0 if n == 1 else int(round(min(1.0, max(0.0, depth)) * (n - 1)))


def tasks_from_specs(specs: Sequence[str], encode: Encode, vocab_size: int,
                     haystack: np.ndarray | None) -> list[Task]:
    return [build_task(s, encode, vocab_size, haystack) for s in specs]
