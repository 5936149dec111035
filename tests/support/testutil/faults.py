"""Fault injection against real `titanforge train` processes (tests/faults, bench/faults.py).

A *sequence* works on one output directory: each fault starts a run and hurts it (SIGKILL of the
job or of one rank at a random moment or inside a save, SIGTERM, a second run on the same
directory, a resume with a changed model) or hurts what is on disk (a checkpoint file or a data
shard flipped, truncated or deleted); then runs go on until one finishes. The end state is
compared with an uninterrupted run of the same job:

- weights: the final checkpoint's model/optimizer shards hold the same bytes (sha256);
- metrics.jsonl: every step 1..N exactly once, each loss bit-identical;
- W&B (the offline files of the final run id): every step exactly once, each loss identical;
- partial loads: a changed-model resume must refuse (exit 2) and leave the directory unchanged.

A fault's own outcome is checked too (the refusal's exit status and line, the fallback message).
A wait for "step N" reads the output of *this* process, never metrics rows of an earlier run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from testutil import launch_util as lu

CONFIG = "configs/llama-tiny.yaml"
STEP_LINE = re.compile(r"^step +(\d+) \|", re.M)

# 12 steps of a 2-layer 32-wide llama-tiny, a checkpoint every 2 steps (keep 3), W&B offline.
BASE = {**lu.TINY_LLAMA, "train.steps": 12, "train.val_every": 0, "checkpoint.every": 2,
        "checkpoint.keep_last": 3, "wandb.mode": "offline"}


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


class Job:
    """One run of `titanforge train` with its own log file (never mixed with earlier runs)."""

    def __init__(self, sc: "Scenario", extra: dict | None = None, name: str = "run"):
        sc.runs += 1
        done = sc.complete()
        # Where this run resumes (the newest checkpoint, unless it turns out corrupt).
        self.start_step = int(done[-1].name[5:]) if done else 0
        self.log = sc.root / f"{sc.runs:03d}-{name}.log"
        self.f = open(self.log, "w")
        cmd = lu.command(CONFIG, sc.overrides(**(extra or {})), nproc=sc.nproc)
        self.proc = subprocess.Popen(cmd, env=lu.env(), cwd=lu.ROOT, stdout=self.f, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.t0 = time.time()

    def text(self) -> str:
        self.f.flush()
        return self.log.read_text(errors="replace")

    def last_step(self) -> int:
        return max((int(m) for m in STEP_LINE.findall(self.text())), default=0)

    def wait_step(self, step: int, timeout: float = 120) -> bool:
        """True once this process printed step >= `step`; False if it ended first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.last_step() >= step:
                return True
            if self.proc.poll() is not None:
                return self.last_step() >= step
            time.sleep(0.05)
        raise AssertionError(f"{self.log}: step {step} not reached in {timeout}s")

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.log}: still running after {timeout}s") from None

    def kill(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def ranks(self) -> list:
        return lu.ranks(self.proc)


@dataclass
class Record:
    kind: str
    injected: bool
    ok: bool
    detail: str = ""


@dataclass
class Scenario:
    root: Path
    data: Path
    nproc: int = 1
    extra: dict = field(default_factory=dict)
    runs: int = 0
    # Files this sequence damaged -> their sha256 after the damage (None: deleted). A checkpoint
    # stays damaged across faults until a later save at the same step replaces its folder.
    damaged: dict = field(default_factory=dict)

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.out = self.root / "out"

    def overrides(self, **extra) -> list[str]:
        return lu.overrides(self.data, self.out, base=BASE, **{**self.extra, **extra})

    @property
    def ckpts(self) -> Path:
        return self.out / "checkpoints"

    def complete(self) -> list[Path]:
        if not self.ckpts.exists():
            return []
        return sorted(p for p in self.ckpts.iterdir() if re.fullmatch(r"step_\d{8}", p.name))

    def is_damaged(self, ckpt: Path) -> bool:
        """True while a file this sequence damaged in `ckpt` is still in its damaged state."""
        return any(ckpt in f.parents and (_sha(f) if f.exists() else None) == state
                   for f, state in self.damaged.items())


# -- the uninterrupted reference ----------------------------------------------------------------
@dataclass
class Reference:
    losses: dict
    shards: dict  # name -> sha256 of the final checkpoint's .distcp files
    seconds: float
    out: Path


def reference(root: Path, data: Path, nproc: int = 1, extra: dict | None = None) -> Reference:
    sc = Scenario(root, data, nproc, dict(extra or {}))
    t0 = time.time()
    job = Job(sc, name="reference")
    rc = job.wait()
    assert rc == 0, job.text()
    final = sc.complete()[-1]
    return Reference(lu.losses(sc.out), {p.name: _sha(p) for p in final.glob("*.distcp")}, time.time() - t0,
                     sc.out)


# -- faults ---------------------------------------------------------------------------------------
def _random_moment(job: Job, rng: random.Random, ref: Reference) -> bool:
    """Wait for a random moment of the run's remaining steps (once a randomly drawn step has been
    printed, plus up to 0.3 s: inside that step's save, the next step's shard read or compute);
    False if the run ended before."""
    last = max(ref.losses)
    target = rng.randint(job.start_step + 1, last - 1) if job.start_step + 1 <= last - 1 else last
    if not job.wait_step(target, timeout=300):
        return False
    time.sleep(rng.uniform(0, 0.3))
    return job.proc.poll() is None


def fault_kill(sc: Scenario, rng, ref) -> Record:
    job = Job(sc, name="kill")
    hit = _random_moment(job, rng, ref)
    step = job.last_step()
    job.kill()
    return Record("sigkill_job_random", hit, True, f"at step {step}")


def fault_kill_in_save(sc: Scenario, rng, ref) -> Record:
    """SIGKILL while a checkpoint is being written: when a new step_*.tmp folder shows, or a few
    milliseconds after a step that saves (every 2) is printed, whichever is seen first."""
    job = Job(sc, name="kill-in-save")
    before = {p.name for p in sc.ckpts.glob("*.tmp")} if sc.ckpts.exists() else set()
    start = job.last_step()
    while job.proc.poll() is None:
        step = job.last_step()
        saving = sc.ckpts.exists() and any(p.name not in before for p in sc.ckpts.glob("*.tmp"))
        if saving or (step > start and step % 2 == 0):
            time.sleep(rng.uniform(0, 0.02))
            job.kill()
            return Record("sigkill_inside_save", True, True, f"at step {step}" + (" (tmp seen)" if saving else ""))
        time.sleep(0.002)
    return Record("sigkill_inside_save", False, True, "the run ended first")


def fault_kill_after_save(sc: Scenario, rng, ref) -> Record:
    """SIGKILL once this run has committed a checkpoint of its own and printed a later step."""
    job = Job(sc, name="kill-after-save")
    before = {p.name for p in sc.complete()}
    while job.proc.poll() is None:
        new = [int(p.name[5:]) for p in sc.complete() if p.name not in before]
        if new and job.last_step() > max(new):
            job.kill()
            return Record("sigkill_after_a_save", True, True, f"at step {job.last_step()}")
        time.sleep(0.01)
    return Record("sigkill_after_a_save", False, True, "the run ended first")


def fault_kill_rank(sc: Scenario, rng, ref) -> Record:
    job = Job(sc, name="kill-rank")
    hit = _random_moment(job, rng, ref)
    ranks = job.ranks()
    if not hit or not ranks:
        job.wait()
        return Record("sigkill_one_rank", False, True, "the run ended first")
    victim = rng.randrange(len(ranks))
    try:
        ranks[victim].kill()
    except Exception:  # noqa: BLE001
        pass
    rc = job.wait()
    return Record("sigkill_one_rank", True, rc != 0 or "[done]" in job.text(), f"rank {victim}, exit {rc}")


def fault_sigterm(sc: Scenario, rng, ref) -> Record:
    job = Job(sc, name="sigterm")
    hit = _random_moment(job, rng, ref)
    if hit:
        try:
            os.kill(job.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            hit = False
    rc = job.wait()
    text = job.text()
    ok = rc == 0 and ("preemption signal: saved step" in text or "[done]" in text) and "Traceback" not in text
    return Record("sigterm", hit, ok, f"exit {rc}" + ("" if ok else ": " + text[-800:]))


def fault_second_run(sc: Scenario, rng, ref) -> Record:
    first = Job(sc, name="lock-holder")
    if not first.wait_step(1):
        first.wait()
        return Record("second_run_same_dir", False, True, "the first run ended first")
    second = Job(sc, name="second")
    rc = second.wait(timeout=120)
    text = second.text()
    if rc == 0 and first.proc.poll() == 0 and "is in use" not in text:
        # The first run reached its last step and let go before the second looked: no fault.
        return Record("second_run_same_dir", False, True, "the first run ended before the second's check")
    ok = rc == 2 and "is in use by another run" in text and "checkpoint.break_lock=true" in text
    _random_moment(first, rng, ref)
    first.kill()
    return Record("second_run_same_dir", True, ok, f"second exit {rc}" + ("" if ok else ": " + text[-600:]))


# Each differs from the job's model (llama-tiny: 2 layers, d_model 32, 2 heads, vocab 50304); a
# "change" equal to the saved value is no change, and a bench run counted one as a bad outcome.
CHANGED_MODELS = ({"model.n_layers": 3}, {"model.d_model": 48}, {"model.n_heads": 4, "model.n_kv_heads": 4},
                  {"model.vocab_size": 50432})


def _snapshot(sc: Scenario) -> dict:
    files = {}
    for p in sorted(sc.out.rglob("*")) if sc.out.exists() else []:
        if p.is_file() and "wandb" not in p.parts and p.name != "run.lock":
            files[str(p.relative_to(sc.out))] = _sha(p)
    return files


def fault_changed_model(sc: Scenario, rng, ref) -> Record:
    if not sc.complete():
        return Record("resume_with_changed_model", False, True, "no checkpoint yet")
    change = rng.choice(CHANGED_MODELS)
    before = _snapshot(sc)
    job = Job(sc, change, name="changed-model")
    rc = job.wait()
    text = job.text()
    unchanged = _snapshot(sc) == before
    ok = rc == 2 and "saved with another model" in text and unchanged and "Traceback" not in text
    return Record("resume_with_changed_model", True, ok,
                  f"{change}: exit {rc}, directory unchanged: {unchanged}" + ("" if ok else ": " + text[-600:]))


def damage(path: Path, how: str, rng) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(max(1, len(data)))])
    else:
        data = bytearray(path.read_bytes())
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))


def damage_checkpoint(sc: Scenario, victim: Path, how: str, rng) -> None:
    """`damage` a file of a checkpoint and remember it, so later faults know that checkpoint is bad."""
    damage(victim, how, rng)
    sc.damaged[victim] = _sha(victim) if victim.exists() else None


def fault_corrupt_checkpoint(sc: Scenario, rng, ref, file: str | None = None, how: str | None = None) -> Record:
    """Damage a file of the newest checkpoint (`file` and `how`, else drawn at random); the next run
    must name it in a warning line that says it falls back, and resume from the newest older
    checkpoint that no earlier fault of this sequence left damaged (or, with none, refuse with
    exit 2 rather than start from step 0)."""
    done = sc.complete()
    if not done:
        return Record("corrupt_checkpoint", False, True, "no checkpoint yet")
    newest = done[-1]
    victim = newest / file if file else rng.choice(sorted(p for p in newest.rglob("*") if p.is_file()))
    how = how or rng.choice(("flip", "truncate", "delete"))
    damage_checkpoint(sc, victim, how, rng)
    detail = f"{how} {victim.relative_to(sc.out)}"
    # Not done[-2]: an earlier fault may have damaged it (and a fallback run does not replace it
    # unless it saves at the same step), so the run rightly goes further back.
    intact = [c for c in done[:-1] if not sc.is_damaged(c)]
    job = Job(sc, name="after-corrupt")
    if not intact:
        rc = job.wait()
        text = job.text()
        ok = rc == 2 and "verifies" in text and "checkpoint.allow_fresh_start=true" in text
        # What a user would do: drop the broken ones (or allow_fresh_start).
        for ckpt in done:
            shutil.rmtree(ckpt)
        return Record("corrupt_checkpoint", True, ok, detail + f", no intact older checkpoint: exit {rc}")
    expected = intact[-1]
    ok = job.wait_step(int(expected.name[5:]) + 1)
    text = job.text()
    # One line names the damaged checkpoint and the fallback (the trainer's path for the file, or
    # for the checkpoint when checksums.json is gone; a flipped checksums.json names the file
    # whose sum no longer matches).
    warned = [ln for ln in text.splitlines()
              if ln.startswith(f"[checkpoint] WARNING: {newest}") and "falling back to the previous checkpoint" in ln]
    ok = ok and len(warned) == 1 and f"[resume] from {expected} at step" in text
    _random_moment(job, rng, ref)
    job.kill()
    lines = [ln for ln in text.splitlines() if ln.startswith(("[checkpoint]", "[resume]"))]
    return Record("corrupt_checkpoint", True, ok,
                  detail + f", expected resume from {expected.name}" + ("" if ok else ": " + "\n".join(lines)[-800:]))


FAULTS = {"kill": fault_kill, "kill_after_save": fault_kill_after_save, "kill_in_save": fault_kill_in_save, "kill_rank": fault_kill_rank,
          "sigterm": fault_sigterm, "second_run": fault_second_run, "changed_model": fault_changed_model,
          "corrupt_checkpoint": fault_corrupt_checkpoint}


# -- the end state --------------------------------------------------------------------------------
def wandb_steps(out: Path, run_id: str) -> dict[int, list[float]]:
    from titanforge.trainer.wandb_file import history

    steps: dict[int, list[float]] = {}
    for f in sorted(out.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for row in history(f):
            if "loss" in row:
                steps.setdefault(int(row["_step"]), []).append(row["loss"])
    return steps


def finish_and_check(sc: Scenario, ref: Reference) -> dict:
    """Run until done; compare the end state with the reference. Returns the verdict."""
    for _ in range(3):
        job = Job(sc, name="final")
        rc = job.wait()
        if rc == 0 and "(done)" in job.text():
            break
    else:
        return {"finished": False, "log": job.text()[-1500:]}
    n = max(ref.losses)
    rows = [r for r in lu.metrics(sc.out) if "loss" in r]
    steps = [r["step"] for r in rows]
    final = sc.complete()[-1]
    meta = json.loads((final / "meta.json").read_text())
    wb = wandb_steps(sc.out, meta["wandb_run_id"])
    return {
        "finished": True,
        "weights_equal": {p.name: _sha(p) for p in final.glob("*.distcp")} == ref.shards and final.name ==
        f"step_{n:08d}",
        "metrics_missing": sorted(set(range(1, n + 1)) - set(steps)),
        "metrics_doubled": sorted({s for s in steps if steps.count(s) > 1}),
        "metrics_losses_equal": {r["step"]: r["loss"] for r in rows} == ref.losses,
        "wandb_missing": sorted(set(range(1, n + 1)) - set(wb)),
        "wandb_doubled": sorted(s for s, v in wb.items() if len(v) > 1),
        "wandb_losses_equal": {s: v[0] for s, v in wb.items()} == ref.losses,
    }


def good(verdict: dict) -> bool:
    return (verdict.get("finished") and verdict["weights_equal"] and verdict["metrics_losses_equal"]
            and verdict["wandb_losses_equal"] and not any(verdict[k] for k in (
                "metrics_missing", "metrics_doubled", "wandb_missing", "wandb_doubled")))


def run_sequence(sc: Scenario, ref: Reference, kinds: list[str], rng: random.Random) -> tuple[list[Record], dict]:
    records = [FAULTS[k](sc, rng, ref) for k in kinds]
    return records, finish_and_check(sc, ref)


# -- ENOSPC: a size-limited directory (tmpfs in a user+mount namespace) ----------------------------
def can_limit_size() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
                                       "mount -t tmpfs -o size=1m tmpfs /tmp"],
        capture_output=True).returncode == 0


def enospc_run(root: Path, data: Path, ref: Reference, size_mb: int) -> tuple[Record, dict]:
    """Train in a tmpfs of `size_mb` MiB (room for about one and a half checkpoints): the second
    save runs out of space. Expect exit 1 with one 'no space left' line, no partial folder, the
    first checkpoint still newest; then the folder is copied to a large disk and resumed."""
    sc = Scenario(root, data)
    mnt = root / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    inner = sc.overrides(output_dir=mnt / "out")
    cmd = " ".join(f"'{c}'" for c in lu.command(CONFIG, inner))
    script = (f"mount -t tmpfs -o size={size_mb}m tmpfs '{mnt}' || exit 99\n"
              f"{cmd}; rc=$?\n"
              f"ls '{mnt}/out/checkpoints' > '{root}/listing.txt'\n"
              f"cp -a '{mnt}/out' '{sc.out}'\n"
              f"exit $rc\n")
    proc = subprocess.run(["unshare", "-rm", "bash", "-c", script], env=lu.env(), cwd=lu.ROOT, capture_output=True,
                          text=True, timeout=300)
    (root / "enospc.log").write_text(proc.stdout + proc.stderr)
    listing = (root / "listing.txt").read_text().split() if (root / "listing.txt").exists() else []
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("titanforge:")]
    ok = (proc.returncode == 1 and len(err_lines) == 1 and "no space left on device" in err_lines[0]
          and "partial checkpoint was removed" in err_lines[0] and not any(n.endswith(".tmp") for n in listing)
          and listing and "Traceback" not in proc.stderr)
    record = Record("enospc_during_save", proc.returncode != 99, ok,
                    f"exit {proc.returncode}, left {listing}" + ("" if ok else ": " + proc.stderr[-800:]))
    # The same job on a large disk: resumes from what the full disk kept.
    verdict = finish_and_check(sc, ref)
    return record, verdict


def shard_data(src: Path, dst: Path, rng: random.Random, hows=("flip",), seed: int = 0) -> list[str]:
    """A copy of the data set whose first train shards in the loader's order (seed `seed`) are
    damaged, one per entry of `hows`; a skipped shard hands over to the next, so a short run meets
    them all. Returns the damaged shards' file names."""
    from titanforge.data.order import GlobalOrder

    shutil.copytree(src, dst)
    shards = json.loads((dst / "manifest.json").read_text())["splits"]["train"]["shards"]
    order = GlobalOrder([s["samples"] for s in shards], seed, True).shard_order(0)
    names = []
    for i, how in enumerate(hows):
        victim = dst / shards[int(order[i])]["file"]
        damage(victim, how, rng)
        names.append(victim.name)
    return names
