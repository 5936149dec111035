"""Transformer² at toy scale: SVF experts against the base model and against LoRA of the same
trainable-parameter count, the REINFORCE objective, and the three adaptation strategies.

    .venv/bin/python -P bench/svf.py                 # the committed run (see README)
    .venv/bin/python -P bench/svf.py --base-steps 100 --steps 20   # a quick look

All in one process on the CPU. Data: the default corpus tokenized with a byte-level BPE of 512
tokens (`prepare_corpus`, cached under runs/svf/data), task samples of 96 tokens from data/tasks
(the answer at the end, scored by teacher forcing on the answer tokens as trainer/evaluate.py does).

1. Base: a Llama (d_model 64, 2 layers) trained from scratch on a mixture of corpus rows (loss on
   every token), task rows of TASKS + HELD_OUT (loss on the answer tokens) and tag rows: a task
   prompt (without its answer) followed by the fixed adaptation prompt " Task:" and the task's tag
   token (loss on the tag), so the base model can name the task (strategy a).
2. Per task of TASKS: an SVF expert (z of every block matrix) and LoRA at the rank whose
   trainable-parameter count is closest to SVF's, each trained with cross-entropy on the answer
   tokens for the same steps x batch, with the same learning-rate grid (best on a validation set,
   reported on a test set). On the first task also SVF trained with REINFORCE (exact-match
   reward, KL to the base), same steps, from z = 1.
3. Adaptation on held-out test prompts mixed from TASKS and HELD_OUT:
   (a) prompt: the base model, given prompt + " Task:", picks the tag with the highest logit among
       the experts' tags; the matching expert answers;
   (b) classifier: an SVF expert trained (cross-entropy on the tag) to name the task, then the
       matching expert;
   (c) few-shot: `cem_search` over mixing weights of the experts on 8 examples of each task
       (the held-out one included), the mixture answering that task's test prompts.
   Against the base model and the oracle (the task's own expert; none for the held-out task).

Writes bench/results/svf.json and bench/results/svf.md (the table the README quotes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from machine_info import cpu_model  # noqa: E402

TASKS = {"passkey": "passkey:digits=2", "mqar": "mqar:pairs=4,queries=1,keys=16,values=16,noise=16",
         "babilong": "babilong:facts=2"}
HELD_OUT = {"niah_number": "niah_number:digits=2"}
TAGS = (" A", " B", " C")
ADAPT_PROMPT = " Task:"
LENGTH = 96


class Data:
    """Task samples as (tokens [B, T], target mask [B, T-1]) batches, and corpus rows."""

    def __init__(self, path: Path, seed: int):
        from titanforge.data.tasks import build_task, corpus_tokens, task_tokenizer

        enc, vocab = task_tokenizer(path)
        self.vocab = vocab
        hay = corpus_tokens(path, "train")
        self.hay = hay
        self.tasks = {n: build_task(s, enc, vocab, hay) for n, s in {**TASKS, **HELD_OUT}.items()}
        self.tag_ids = [enc(t) for t in TAGS]
        assert all(len(t) == 1 for t in self.tag_ids), "each tag must be one token"
        self.tag_ids = [t[0] for t in self.tag_ids]
        self.adapt = np.asarray(enc(ADAPT_PROMPT), dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    def answer_batch(self, task: str, n: int, rng=None):
        rng = rng or self.rng
        toks, masks = [], []
        for _ in range(n):
            s = self.tasks[task].sample(rng, LENGTH)
            toks.append(s.tokens)
            masks.append(s.loss_mask())
        return torch.from_numpy(np.stack(toks)), torch.from_numpy(np.stack(masks))

    def tag_batch(self, task: str, n: int, rng=None):
        """prompt (answer cut) + adaptation prompt + tag; right-padded, mask on the tag."""
        rng = rng or self.rng
        tag = self.tag_ids[list(TASKS).index(task)] if task in TASKS else None
        T = LENGTH + len(self.adapt) + 1
        toks, masks = np.zeros((n, T), np.int64), np.zeros((n, T - 1), bool)
        for i in range(n):
            s = self.tasks[task].sample(rng, LENGTH)
            start = s.spans[0][0]
            row = np.concatenate([s.tokens[:start], self.adapt, [tag if tag is not None else 0]])
            toks[i, :len(row)] = row
            masks[i, len(row) - 2] = True
        return torch.from_numpy(toks), torch.from_numpy(masks)

    def corpus_batch(self, n: int):
        starts = self.rng.integers(0, len(self.hay) - LENGTH - 1, n)
        toks = torch.from_numpy(np.stack([self.hay[s:s + LENGTH] for s in starts]).astype(np.int64))
        return toks, torch.ones(n, LENGTH - 1, dtype=torch.bool)


def pad_cat(parts):
    """Concatenate (tokens, mask) batches of different lengths, right-padded (mask False)."""
    T = max(t.shape[1] for t, _ in parts)
    toks = torch.cat([F.pad(t, (0, T - t.shape[1])) for t, _ in parts])
    mask = torch.cat([F.pad(m, (0, T - 1 - m.shape[1]), value=False) for _, m in parts])
    return toks, mask


def masked_ce(model, toks, mask):
    logits = model(toks[:, :-1]).float()
    return F.cross_entropy(logits[mask], toks[:, 1:][mask])


@torch.no_grad()
def exact_match(model, toks, mask) -> torch.Tensor:
    """[B] bool: every answer token is the argmax at its position (teacher forcing)."""
    pred = model(toks[:, :-1]).argmax(-1)
    ok = (pred == toks[:, 1:]) | ~mask
    return ok.all(1)


def train(model, batches, steps: int, lr: float, loss_fn=masked_ce) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    t0 = time.perf_counter()
    for step in range(steps):
        loss = loss_fn(model, *batches(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return time.perf_counter() - t0


def build(vocab: int, args):
    from titanforge.launch.config import load_config
    from titanforge.models.registry import build_model

    over = {"model.vocab_size": vocab, "model.d_model": args.d_model, "model.n_layers": args.layers,
            "model.n_heads": 4, "model.n_kv_heads": 4, "model.max_seq_len": 2 * LENGTH, "data.path": "x"}
    job = load_config(ROOT / "configs" / "llama-tiny.yaml", [f"{k}={v}" for k, v in over.items()])
    torch.manual_seed(args.seed)
    model = build_model(job.model)
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--base-steps", type=int, default=1000)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--base-batch", type=int, default=24)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=100, help="steps of each expert / LoRA / REINFORCE run")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 5e-2], help="SVF learning-rate grid")
    p.add_argument("--lora-lrs", type=float, nargs="+", default=[1e-3, 5e-3], help="LoRA learning-rate grid")
    p.add_argument("--kl", type=float, default=0.1, help="REINFORCE KL coefficient")
    p.add_argument("--val", type=int, default=32, help="validation prompts per task (lr choice)")
    p.add_argument("--test", type=int, default=100, help="test prompts per task")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--cem-iters", type=int, default=5)
    p.add_argument("--cem-population", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/svf")
    p.add_argument("--out", default="bench/results/svf.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from titanforge.data import prepare_corpus
    from titanforge.models.lora import apply_lora
    from titanforge.models.svf import SVFConfig, load_z, mix_z, z_state_dict
    from titanforge.trainer.svf import (adapt_few_shot, classify_task, prepare_svf, reinforce_loss,
                                        trainable_summary)

    t_all = time.perf_counter()
    data_dir = ROOT / args.work / "data"
    if not (data_dir / "manifest.json").exists():
        prepare_corpus(data_dir, tokenizer="bpe:512", seq_len=64, val_fraction=0.05, seed=0)
    D = Data(data_dir, args.seed)
    vocab = 64 * -(-D.vocab // 64)
    names, all_names = list(TASKS), list(TASKS) + list(HELD_OUT)
    ev_rng = lambda k: np.random.default_rng(10_000 + k)  # noqa: E731
    val = {n: D.answer_batch(n, args.val, ev_rng(i)) for i, n in enumerate(all_names)}
    test = {n: D.answer_batch(n, args.test, ev_rng(100 + i)) for i, n in enumerate(all_names)}
    test_tag = {n: D.tag_batch(n, args.test, ev_rng(100 + i)) for i, n in enumerate(all_names)}  # same prompts
    shots = {n: D.answer_batch(n, args.shots, ev_rng(200 + i)) for i, n in enumerate(all_names)}

    def acc(model, batch) -> float:
        return exact_match(model, *batch).float().mean().item()

    # 1. Base model.
    base = build(vocab, args)
    n_base = sum(p.numel() for p in base.parameters())
    per = 2  # task rows and tag rows per task in a base batch; the rest are corpus rows
    if args.base_batch <= per * 2 * len(all_names):
        raise SystemExit(f"--base-batch {args.base_batch} leaves no corpus rows; give more than {per * 2 * len(all_names)}")

    def base_batches(step):
        parts = [D.corpus_batch(args.base_batch - per * (2 * len(all_names)))]
        for n in all_names:
            parts.append(D.answer_batch(n, per))
            parts.append(D.tag_batch(n, per) if n in TASKS else D.answer_batch(n, per))
        return pad_cat(parts)

    print(f"[base] {n_base:,} parameters, {args.base_steps} steps", flush=True)
    base_s = train(base, base_batches, args.base_steps, args.base_lr)
    base.eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    record_base = {"parameters": n_base, "steps": args.base_steps, "seconds": round(base_s, 1),
                   "accuracy": {n: acc(base, test[n]) for n in all_names},
                   "tag_accuracy": {n: (classify_task(base, test_tag[n][0], test_tag[n][1], D.tag_ids)
                                        == names.index(n)).float().mean().item() for n in names}}
    print(f"[base] {base_s:.0f} s, accuracy {record_base['accuracy']}, tags {record_base['tag_accuracy']}", flush=True)

    def fresh():
        m = build(vocab, args)
        m.load_state_dict(base_state)
        m.eval()  # no dropout in these models; eval() only for clarity
        return m

    svf_cfg = SVFConfig()
    svf_model = fresh()
    prepare_svf(svf_model, svf_cfg)
    n_svf = trainable_summary(svf_model)[0]
    lora_counts = {}
    for r in range(1, 9):
        m = fresh()
        apply_lora(m, r)
        lora_counts[r] = trainable_summary(m)[0]
    lora_rank = min(lora_counts, key=lambda r: abs(lora_counts[r] - n_svf))
    print(f"[svf] {n_svf:,} trainable; LoRA rank {lora_rank}: {lora_counts[lora_rank]:,}", flush=True)

    def fit(make, lrs, task_batches, score):
        best = None
        for lr in lrs:
            m = make()
            g = np.random.default_rng(args.seed + 1)  # the same batches for every run
            saved, D.rng = D.rng, g
            sec = train(m, task_batches, args.steps, lr)
            D.rng = saved
            v = score(m)
            if best is None or v > best[1]:
                best = (m, v, lr, sec)
        return best

    def make_svf():
        m = fresh()
        prepare_svf(m, svf_cfg)
        return m

    def make_lora():
        m = fresh()
        apply_lora(m, lora_rank)
        return m

    experts, per_task = {}, {}
    for n in names:
        batches = lambda step, n=n: D.answer_batch(n, args.batch)  # noqa: E731
        sm, sv, slr, ss = fit(make_svf, args.lrs, batches, lambda m, n=n: acc(m, val[n]))
        lm, lv, llr, ls = fit(make_lora, args.lora_lrs, batches, lambda m, n=n: acc(m, val[n]))
        experts[n] = z_state_dict(sm)
        per_task[n] = {"base": record_base["accuracy"][n], "svf": acc(sm, test[n]), "lora": acc(lm, test[n]),
                       "svf_lr": slr, "lora_lr": llr, "svf_seconds": round(ss, 1), "lora_seconds": round(ls, 1),
                       "chance": D.tasks[n].chance}
        print(f"[{n}] {per_task[n]}", flush=True)

    # REINFORCE on the first task: exact-match reward, KL to z = 1.
    rl_task = names[0]
    gen = torch.Generator().manual_seed(args.seed)
    rl_log = []

    def rl_loss(model, toks, mask):
        start = int(mask[0].nonzero()[0]) + 1
        loss, info = reinforce_loss(model, toks[:, :start], None, toks[:, start:], args.kl, gen)
        rl_log.append(info["reward"])
        return loss

    def rl_fit():
        best = None
        for lr in args.lrs:
            m = make_svf()
            saved, D.rng = D.rng, np.random.default_rng(args.seed + 1)
            rl_log.clear()
            sec = train(m, lambda step: D.answer_batch(rl_task, args.batch), args.steps, lr, rl_loss)
            D.rng = saved
            v = acc(m, val[rl_task])
            if best is None or v > best[1]:
                best = (m, v, lr, sec, list(rl_log))
        return best

    rm, _, rlr, rs, rewards = rl_fit()
    per_task[rl_task]["svf_reinforce"] = acc(rm, test[rl_task])
    reinforce = {"task": rl_task, "lr": rlr, "kl_coef": args.kl, "seconds": round(rs, 1),
                 "accuracy": per_task[rl_task]["svf_reinforce"],
                 "mean_reward_first_10": float(np.mean(rewards[:10])), "mean_reward_last_10": float(np.mean(rewards[-10:]))}
    print(f"[reinforce] {reinforce}", flush=True)

    # 3. Adaptation. The classifier expert: SVF trained on the tag rows.
    tag_batches = lambda step: pad_cat([D.tag_batch(n, args.batch // len(names)) for n in names])  # noqa: E731
    val_tag = [D.tag_batch(n, args.val, ev_rng(300 + i)) for i, n in enumerate(names)]
    cm, _, clr, cs = fit(make_svf, args.lrs, tag_batches,
                         lambda m: float(np.mean([(classify_task(m, t, k, D.tag_ids) == i).float().mean().item()
                                                  for i, (t, k) in enumerate(val_tag)])))
    runner = make_svf()

    def answer_with(route: torch.Tensor, n: str) -> float:
        """Accuracy on task n's test prompts, each answered by the expert its route names."""
        toks, mask = test[n]
        ok = torch.zeros(len(toks), dtype=torch.bool)
        for k, e in enumerate(names):
            sel = route == k
            if sel.any():
                load_z(runner, experts[e])
                ok[sel] = exact_match(runner, toks[sel], mask[sel])
        return ok.float().mean().item()

    adapt = {}
    t0 = time.perf_counter()
    for n in all_names:
        tk, mk = test_tag[n]
        r_prompt = classify_task(base, tk, mk, D.tag_ids)
        r_cls = classify_task(cm, tk, mk, D.tag_ids)
        score_toks, score_mask = shots[n]

        @torch.no_grad()
        def score(model):
            # Exact match, ties broken by the mean log-probability of the answer tokens.
            logp = F.log_softmax(model(score_toks[:, :-1]).float(), -1)
            lp = logp.gather(-1, score_toks[:, 1:, None])[..., 0][score_mask].mean().item()
            ok = ((logp.argmax(-1) == score_toks[:, 1:]) | ~score_mask).all(1).float().mean().item()
            return ok + 1e-3 * lp

        alpha = adapt_few_shot(runner, [experts[e] for e in names], score, iters=args.cem_iters,
                               population=args.cem_population, elite=max(2, args.cem_population // 4),
                               seed=args.seed)
        load_z(runner, mix_z([experts[e] for e in names], alpha))
        fs = acc(runner, test[n])
        adapt[n] = {"base": record_base["accuracy"][n],
                    "oracle": per_task[n]["svf"] if n in per_task else None,
                    "prompt": answer_with(r_prompt, n), "classifier": answer_with(r_cls, n), "few_shot": fs,
                    "prompt_routing": (r_prompt == names.index(n)).float().mean().item() if n in names else None,
                    "classifier_routing": (r_cls == names.index(n)).float().mean().item() if n in names else None,
                    "few_shot_alpha": [round(float(a), 3) for a in alpha]}
        print(f"[adapt {n}] {adapt[n]}", flush=True)
    adapt_s = time.perf_counter() - t0

    record = {"benchmark": "svf", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "command": " ".join(["python -P bench/svf.py", *sys.argv[1:]]),
              "machine": {"cpu": cpu_model(), "threads": args.threads, "cores_visible": os.cpu_count()},
              "model": {"family": "llama", "d_model": args.d_model, "layers": args.layers, "vocab": vocab,
                        "parameters": n_base},
              "tasks": TASKS, "held_out": HELD_OUT, "length": LENGTH, "batch": args.batch, "steps": args.steps,
              "svf_lrs": args.lrs, "lora_lrs": args.lora_lrs, "test_prompts_per_task": args.test,
              "val_prompts_per_task": args.val, "shots": args.shots,
              "trainable": {"svf": n_svf, "lora_rank": lora_rank, "lora": lora_counts[lora_rank],
                            "lora_by_rank": lora_counts},
              "base": record_base, "per_task": per_task, "reinforce": reinforce,
              "classifier": {"lr": clr, "seconds": round(cs, 1)}, "adaptation": adapt,
              "adaptation_seconds": round(adapt_s, 1), "total_seconds": round(time.perf_counter() - t_all, 1)}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(record) + "\n")
    print(table(record))
    return 0


def table(r: dict) -> str:
    pc = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    t = r["trainable"]
    lines = [f"Experts ({r['steps']} steps x batch {r['batch']}; trainable: SVF {t['svf']:,}, "
             f"LoRA rank {t['lora_rank']} {t['lora']:,}; base {r['model']['parameters']:,} parameters, "
             f"{r['base']['steps']} steps):", "",
             "| task | chance | base | SVF | LoRA | SVF REINFORCE | SVF s | LoRA s |", "|---|---|---|---|---|---|---|---|"]
    for n, x in r["per_task"].items():
        lines.append(f"| {n} | {pc(x['chance'])} | {pc(x['base'])} | {pc(x['svf'])} | {pc(x['lora'])} | "
                     f"{pc(x.get('svf_reinforce'))} | {x['svf_seconds']} | {x['lora_seconds']} |")
    lines += ["", "Adaptation on held-out prompts (routing = share sent to the task's own expert):", "",
              "| task | base | oracle | (a) prompt | routing | (b) classifier | routing | (c) few-shot |",
              "|---|---|---|---|---|---|---|---|"]
    for n, x in r["adaptation"].items():
        lines.append(f"| {n} | {pc(x['base'])} | {pc(x['oracle'])} | {pc(x['prompt'])} | {pc(x['prompt_routing'])} | "
                     f"{pc(x['classifier'])} | {pc(x['classifier_routing'])} | {pc(x['few_shot'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
