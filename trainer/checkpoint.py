"""Sharded, atomic, verified checkpoints with torch.distributed.checkpoint (DCP).

Layout of `<output_dir>/checkpoints/`:
    step_00000050/            a complete checkpoint (the rename is the commit point)
        .metadata, __*.distcp DCP's sharded model + optimizer state
        rank_00000.pt ...      per-rank state: data position, RNG states, scheduler
        meta.json              step, W&B run id, world size, counters
        config.yaml            the resolved job config
        checksums.json         sha256 of every file above, written last
    step_00000060.tmp/        a save in progress (never taken for a finished one)

With `parallel.dp_backend=deepspeed` the model is a DeepSpeed engine and DCP's get_state_dict does
not see ZeRO partitions, so the DCP files are replaced by DeepSpeed's own
(`engine.save_checkpoint` into `step_N.tmp/deepspeed/`: model states, one optimizer partition per
rank); everything else (per-rank files, meta, checksums, rename, keep-last, fallback) is the same.
Such a checkpoint resumes only on the same number of ranks with the DeepSpeed backend (ZeRO
partitions are tied to the data-parallel size; DeepSpeed's universal-checkpoint conversion is not
wired in): anything else is rejected by `load` with a message naming the fix.

Tensor-parallel parameters sharded as a `_StridedShard` that no later mesh dimension refines
(Mamba's in_proj: each rank a block of both its x and z halves) are not contiguous chunks of the
global tensor, which DCP cannot write ("overlapping chunks"). They are stored re-sharded as plain
`Shard` on the same dims (the same global tensor, so layouts still interchange) and converted back
after loading: see `dcp_storable`.

DCP has no checksums (a shard with flipped bytes loads silently wrong: STACK-FACTS), so every
file is hashed into `checksums.json`; on resume the newest checkpoint whose files all match is
used and a corrupt one is reported and left on disk untouched (nothing saved is ever deleted
except by keep-last-N, which counts only complete checkpoints).
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from titanforge.trainer.config import CheckpointConfig
from titanforge.trainer.dist import DistInfo, all_reduce, barrier, broadcast_object

_STEP_DIR = re.compile(r"^step_(\d{8})$")
# DeepSpeed's files go into step_N.tmp/<tag>/.
DEEPSPEED_TAG = "deepspeed"


def is_deepspeed_engine(model) -> bool:
    """True for a DeepSpeed engine; never imports DeepSpeed (slow) when nothing else has."""
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def _unstorable(t) -> bool:
    """A DTensor whose _StridedShard on some dim is not followed (in mesh order) by a Shard of the
    same dim: its local piece is not one block of the global tensor. (FSDP2 over TP produces
    _StridedShard followed by the TP Shard, which DCP handles.)"""
    if not isinstance(t, DTensor):
        return False
    pl = t.placements
    return any(isinstance(p, _StridedShard) and not any(
        isinstance(q, Shard) and not isinstance(q, _StridedShard) and q.dim == p.dim for q in pl[i + 1:])
               for i, p in enumerate(pl))


def dcp_storable(obj, restore: dict | None = None, path: tuple = ()):
    """`obj` (nested dicts/lists of a state dict) with every unstorable DTensor redistributed to
    plain Shard placements; `restore[path] = original placements` for `dcp_restore`."""
    if isinstance(obj, dict):
        return {k: dcp_storable(v, restore, path + (k,)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [dcp_storable(v, restore, path + (i,)) for i, v in enumerate(obj)]
    if _unstorable(obj):
        placements = tuple(Shard(p.dim) if isinstance(p, _StridedShard) else p for p in obj.placements)
        if restore is not None:
            restore[path] = obj.placements
        return obj.redistribute(obj.device_mesh, placements)
    return obj


def dcp_restore(obj, restore: dict, path: tuple = ()):
    """Inverse of `dcp_storable` for the entries it converted."""
    if isinstance(obj, dict):
        return {k: dcp_restore(v, restore, path + (k,)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [dcp_restore(v, restore, path + (i,)) for i, v in enumerate(obj)]
    if path in restore:
        return obj.redistribute(obj.device_mesh, restore[path])
    return obj


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class CheckpointSpaceError(CheckpointError):
    """The disk filled during a save; the partial checkpoint was removed."""


# DCP reports a rank's failure as CheckpointException, a BaseException.
_SAVE_ERRORS = (Exception, CheckpointException)


def _is_enospc(err: BaseException, root: Path) -> bool:
    """ENOSPC anywhere in the chain, by errno or by text (torch.save reports 'file write failed'
    from its C++ writer and DCP wraps rank failures), or a write error with the disk now full."""
    seen = err
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    if "write failed" in text or "unexpected pos" in text or isinstance(err, (OSError, CheckpointException)):
        try:
            return shutil.disk_usage(root if root.exists() else root.parent).free < (1 << 20)
        except OSError:
            return False
    return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify(ckpt: Path) -> None:
    """Raise CheckpointError naming the first missing or altered file."""
    manifest = ckpt / "checksums.json"
    if not manifest.exists():
        raise CheckpointError(f"{ckpt}: no checksums.json (the save did not finish)")
    try:
        sums = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest} is not valid JSON ({e})") from None
    for name, digest in sums.items():
        path = ckpt / name
        if not path.exists():
            raise CheckpointError(f"{path} is missing")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path} is corrupted (sha256 mismatch)")


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints (final name), oldest first."""
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


class Checkpointer:
    def __init__(self, root: str | Path, cfg: CheckpointConfig, info: DistInfo):
        self.root = Path(root)
        self.cfg = cfg
        self.info = info
        self._pending: tuple[int, Path, Any] | None = None
        # Names of checkpoints known to verify (written by this process or checked): keep-last
        # counts only these.
        self._valid: set[str] = set()
        # Called on rank 0 with the step once a checkpoint is committed (the tracker releases the
        # W&B rows up to it).
        self.on_commit = None
        # Async saves run their collectives from a background thread while training issues its
        # own on the default group; sharing one group interleaves them and deadlocks (gloo), so
        # async saves get a group of their own (as torchtitan does).
        self._async_group = (dist.new_group(backend="gloo") if cfg.async_save and dist.is_initialized()
                             else None)

    # -- save ---------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, rank_state: dict, meta: dict, config_yaml: str) -> None:
        self.wait()
        tmp = self.root / f"step_{step:08d}.tmp"
        try:
            self._save(step, tmp, model, optimizer, rank_state, meta, config_yaml)
        except _SAVE_ERRORS as e:
            self._abandon(step, tmp, e)

    def _save(self, step, tmp, model, optimizer, rank_state, meta, config_yaml) -> None:
        def prepare():
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

        self._all_ok(prepare if self.info.is_main else None)
        deepspeed = is_deepspeed_engine(model)

        def local_files():
            torch.save(rank_state, tmp / f"rank_{self.info.rank:05d}.pt")
            if self.info.is_main:
                (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": self.info.world_size,
                                                           "format": "deepspeed" if deepspeed else "dcp"}))
                (tmp / "config.yaml").write_text(config_yaml)

        # Every rank learns whether all ranks wrote their files (a rank alone out of space must not
        # leave the others waiting in the next collective).
        self._all_ok(local_files)
        if deepspeed:
            # Collective: every rank writes its ZeRO partition (synchronous even with async_save).
            model.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False)
            self._pending = (step, tmp, None)
            self.wait()
            return
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = dcp_storable({"model": model_sd, "optimizer": optim_sd})
        if self.cfg.async_save and dist.is_initialized():
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group)
            self._pending = (step, tmp, future)
        else:
            with warnings.catch_warnings():
                # Single-process runs have no process group; DCP warns that it assumes one process.
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(state, checkpoint_id=str(tmp))
            self._pending = (step, tmp, None)
            self.wait()

    def _all_ok(self, fn) -> None:
        """Run this rank's part (fn, or nothing); raise on every rank if any rank's part failed."""
        err = None
        if fn is not None:
            try:
                fn()
            except _SAVE_ERRORS as e:  # re-raised below, on every rank
                err = e
        code = 0 if err is None else (2 if _is_enospc(err, self.root) else 1)
        if dist.is_initialized():
            flag = torch.tensor([code], dtype=torch.int32, device=self.info.device)
            code = int(all_reduce(flag, op=dist.ReduceOp.MAX).item())
        if err is not None:
            raise err
        if code:
            raise (OSError(errno.ENOSPC, "No space left on device (on another rank)") if code == 2
                   else CheckpointError("another rank failed while writing its part of the checkpoint"))

    def _abandon(self, step: int, tmp: Path, err: Exception) -> None:
        """A failed save: remove the partial folder, keep the previous checkpoint the newest, raise
        one line naming the cause."""
        self._pending = None
        if isinstance(err, CheckpointSpaceError):
            raise err
        enospc = _is_enospc(err, self.root)  # (before the partial folder frees its space)
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        done = complete_checkpoints(self.root)
        newest = done[-1].name if done else "none (a restart begins at step 0)"
        if isinstance(err, CheckpointError) and not enospc:
            raise err
        if enospc:
            free = shutil.disk_usage(self.root).free / 2**20 if self.root.exists() else 0.0
            raise CheckpointSpaceError(
                f"no space left on device while saving step {step} to {self.root} ({free:.1f} MiB free): the "
                f"partial checkpoint was removed and the newest checkpoint is still {newest}; free space or "
                f"move output_dir to a larger disk, then rerun the same command to resume") from None
        raise CheckpointError(f"saving step {step} to {tmp} failed ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:300]}); the partial checkpoint was removed and the "
                              f"newest checkpoint is still {newest}") from err

    def wait(self) -> None:
        """Finish the pending save: all ranks done -> checksums -> atomic rename -> prune."""
        if self._pending is None:
            return
        step, tmp, future = self._pending
        try:
            self._all_ok(future.result if future is not None else None)

            def commit():
                sums = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
                (tmp / "checksums.json").write_text(json.dumps(sums, indent=1))
                final = self.root / f"step_{step:08d}"
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                self._valid.add(final.name)

            self._all_ok(commit if self.info.is_main else None)
        except _SAVE_ERRORS as e:
            self._abandon(step, tmp, e)
        self._pending = None
        if self.info.is_main:
            self._prune()
            if self.on_commit is not None:
                self.on_commit(step)
        barrier()

    def _prune(self) -> None:
        """Keep the newest keep_last checkpoints that verify; older ones go. A corrupt one newer
        than those is left for inspection and not counted."""
        kept = 0
        for ckpt in reversed(complete_checkpoints(self.root)):
            if kept >= self.cfg.keep_last:
                shutil.rmtree(ckpt, ignore_errors=True)
                self._valid.discard(ckpt.name)
                continue
            if ckpt.name not in self._valid:
                try:
                    verify(ckpt)
                except CheckpointError:
                    continue
                self._valid.add(ckpt.name)
            kept += 1

    # -- load ---------------------------------------------------------------------------------
    def latest_valid(self, allow_fresh_start: bool = False) -> Path | None:
        """Newest checkpoint whose checksums match (rank 0 decides; all ranks get the answer).

        None when there are no checkpoints. When there are some and none verifies, raise
        CheckpointError listing them (a silent start from step 0 would redo and overwrite the
        run), unless `allow_fresh_start`."""
        choice, problem = None, None
        if self.info.is_main:
            found, bad = complete_checkpoints(self.root), []
            for ckpt in reversed(found):
                try:
                    verify(ckpt)
                except CheckpointError as e:
                    bad.append(str(e))
                    older = "falling back to the previous checkpoint" if ckpt != found[0] else "no older checkpoint"
                    warnings.warn(f"skipping checkpoint: {e}; {older}", stacklevel=2)
                    print(f"[checkpoint] WARNING: {e}; {older}", flush=True)
                    continue
                self._valid.add(ckpt.name)
                choice = str(ckpt)
                break
            if found and choice is None:
                if allow_fresh_start:
                    print(f"[checkpoint] WARNING: none of the {len(found)} checkpoints in {self.root} verifies; "
                          f"starting from step 0 as asked (checkpoint.allow_fresh_start=true)", flush=True)
                else:
                    problem = (f"none of the {len(found)} checkpoints in {self.root} verifies ({'; '.join(bad)}); "
                               f"nothing was started. Restore a good copy, or start from step 0 with "
                               f"checkpoint.allow_fresh_start=true (or checkpoint.resume=never, or another output_dir)")
        choice, problem = broadcast_object((choice, problem))
        if problem:
            raise CheckpointError(problem)
        return Path(choice) if choice else None

    def check_model_keys(self, ckpt: Path, model_sd: dict) -> None:
        """Refuse a load that would leave a parameter unloaded or ignore a saved one (DCP loads
        just the keys asked for): the saved model entries and shapes must equal the model's."""
        saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        saved_model = {k[len("model."):]: tuple(getattr(v, "size", ()))
                       for k, v in saved.items() if k.startswith("model.")}
        ours = {k: tuple(v.shape) for k, v in model_sd.items() if hasattr(v, "shape")}
        missing = sorted(set(ours) - set(saved_model))
        shapes = [f"{k} saved {list(saved_model[k])} vs model {list(ours[k])}"
                  for k in sorted(set(ours) & set(saved_model)) if saved_model[k] != ours[k]]
        held = set(ours)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # A pipeline stage holds only its layers: a saved entry is extra only if no rank holds
            # it, and every rank takes the same decision (a lone raise would leave the others
            # waiting inside DCP's collective load).
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (sorted(ours), missing, shapes))
            held = set().union(*(set(g[0]) for g in gathered))
            missing = sorted(set().union(*(set(g[1]) for g in gathered)))
            shapes = sorted(set().union(*(set(g[2]) for g in gathered)))
        extra = sorted(set(saved_model) - held)
        if missing or extra or shapes:
            def few(names: list[str]) -> str:
                return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")

            parts = ([f"not in the checkpoint: {few(missing)}"] if missing else []) + \
                ([f"not in the model: {few(extra)}"] if extra else []) + \
                ([f"shapes differ: {'; '.join(shapes[:5])}"] if shapes else [])
            raise CheckpointError(f"{ckpt} does not fit this model ({' | '.join(parts)}); nothing was loaded. "
                                  f"Resume with the model config it was saved with ({ckpt / 'config.yaml'}), "
                                  f"or start afresh in another output_dir")

    def load(self, ckpt: Path, model, optimizer) -> tuple[dict, dict]:
        """Load model + optimizer in place; return (this rank's state, meta)."""
        meta = json.loads((ckpt / "meta.json").read_text())
        rank_file = ckpt / f"rank_{self.info.rank:05d}.pt"
        same_world = meta["world_size"] == self.info.world_size and rank_file.exists()
        saved_format, deepspeed = meta.get("format", "dcp"), is_deepspeed_engine(model)
        if saved_format == "deepspeed" and not same_world:
            raise CheckpointError(
                f"{ckpt} was written by DeepSpeed ZeRO on {meta['world_size']} ranks and this run has "
                f"{self.info.world_size}: ZeRO partitions are tied to the data-parallel size (DeepSpeed's "
                f"universal-checkpoint conversion is not supported here). Resume with "
                f"{meta['world_size']} processes in all (e.g. --nproc {meta['world_size']}), or start afresh "
                f"with checkpoint.resume=never or another output_dir")
        if saved_format != ("deepspeed" if deepspeed else "dcp"):
            fix = ("parallel.dp_backend=deepspeed" if saved_format == "deepspeed"
                   else "parallel.dp_backend=ddp or fsdp")
            raise CheckpointError(
                f"{ckpt} was saved in the {saved_format} format and this run uses "
                f"{'deepspeed' if deepspeed else 'dcp'} checkpoints; resume with {fix} (as when it was saved), or "
                f"start afresh with checkpoint.resume=never or another output_dir")
        if deepspeed:
            path, _ = model.load_checkpoint(str(ckpt), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"{ckpt / DEEPSPEED_TAG}: DeepSpeed found no checkpoint to load")
            return torch.load(rank_file, weights_only=False), meta
        if not same_world:
            # A new layout: DCP reshards model and optimizer; the data position is global (the
            # same on every rank), so rank 0's copy serves every new rank. RNG streams are per
            # rank and cannot be mapped: the caller reseeds them.
            rank_file = ckpt / "rank_00000.pt"
            if self.info.is_main:
                print(f"[checkpoint] {ckpt} was written by {meta['world_size']} ranks, this run has "
                      f"{self.info.world_size}: resharding; RNG streams restart from the seed", flush=True)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        self.check_model_keys(ckpt, model_sd)
        restore: dict = {}
        state = dcp_storable({"model": model_sd, "optimizer": optim_sd}, restore)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(ckpt))
        state = dcp_restore(state, restore)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        rank_state = torch.load(rank_file, weights_only=False)
        if not same_world:
            rank_state.pop("rng", None)
        return rank_state, meta

    def close(self) -> None:
        self.wait()


# -- resume: saved config vs new -------------------------------------------------------------
# Keys whose change alters the schedule or optimizer the saved state continues: refused on resume
# unless checkpoint.allow_schedule_change, then applied from the resumed step on (loop.py).
SCHEDULE_KEYS = ("train.steps", "optim.lr", "optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio",
                 "optim.decay_fraction", "optim.beta1", "optim.beta2", "optim.eps", "optim.weight_decay")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare_configs(saved_yaml: str, new_yaml: str) -> tuple[list[str], list[str]]:
    """(model differences, schedule differences) between a checkpoint's config and this run's,
    each as 'key: saved -> new'. Any model.* key changes what the weights mean (shapes, layer
    kinds, norms, positions); other keys (data, layout, logging, ...) may change freely."""
    import yaml

    saved, new = _flat(yaml.safe_load(saved_yaml) or {}), _flat(yaml.safe_load(new_yaml) or {})
    diffs = {k: (saved.get(k, "<unset>"), new.get(k, "<unset>")) for k in sorted(set(saved) | set(new))
             if saved.get(k, "<unset>") != new.get(k, "<unset>")}
    model = [f"{k}: {a} -> {b}" for k, (a, b) in diffs.items() if k.startswith("model.")]
    schedule = [f"{k}: {a} -> {b}" for k, (a, b) in diffs.items() if k in SCHEDULE_KEYS]
    return model, schedule


def resume_config_problem(ckpt: Path, new_yaml: str, allow_schedule_change: bool) -> tuple[str | None, list[str]]:
    """(a one-line refusal or None, the schedule changes to apply) for resuming `ckpt`."""
    path = ckpt / "config.yaml"
    if not path.exists() or not new_yaml:
        return None, []
    model, schedule = compare_configs(path.read_text(), new_yaml)
    if model:
        return (f"{ckpt} was saved with another model ({'; '.join(model)}); resuming would load a different "
                f"network. Use the saved values (see {path}), or start the new model in another output_dir "
                f"(or checkpoint.resume=never)"), []
    if schedule and not allow_schedule_change:
        return (f"{ckpt} was saved with another schedule ({'; '.join(schedule)}); resuming would bend the "
                f"learning-rate schedule mid-run. Use the saved values, or apply the new ones from the resumed "
                f"step on with checkpoint.allow_schedule_change=true"), []
    return None, schedule
