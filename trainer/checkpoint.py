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
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from titanforge.trainer.config import CheckpointConfig
from titanforge.trainer.dist import DistInfo, barrier, broadcast_object

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
        # Async saves run their collectives from a background thread while training issues its
        # own on the default group; sharing one group interleaves them and deadlocks (gloo), so
        # async saves get a group of their own (as torchtitan does).
        self._async_group = (dist.new_group(backend="gloo") if cfg.async_save and dist.is_initialized()
                             else None)

    # -- save ---------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, rank_state: dict, meta: dict, config_yaml: str) -> None:
        self.wait()
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.info.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        deepspeed = is_deepspeed_engine(model)
        torch.save(rank_state, tmp / f"rank_{self.info.rank:05d}.pt")
        if self.info.is_main:
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": self.info.world_size,
                                                       "format": "deepspeed" if deepspeed else "dcp"}))
            (tmp / "config.yaml").write_text(config_yaml)
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

    def wait(self) -> None:
        """Finish the pending save: all ranks done -> checksums -> atomic rename -> prune."""
        if self._pending is None:
            return
        step, tmp, future = self._pending
        self._pending = None
        if future is not None:
            future.result()
        barrier()
        if self.info.is_main:
            sums = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / "checksums.json").write_text(json.dumps(sums, indent=1))
            final = self.root / f"step_{step:08d}"
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        barrier()

    def _prune(self) -> None:
        done = complete_checkpoints(self.root)
        for old in done[: max(0, len(done) - self.cfg.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    # -- load ---------------------------------------------------------------------------------
    def latest_valid(self) -> Path | None:
        """Newest checkpoint whose checksums match (rank 0 decides; all ranks get the answer)."""
        choice = None
        if self.info.is_main:
            for ckpt in reversed(complete_checkpoints(self.root)):
                try:
                    verify(ckpt)
                except CheckpointError as e:
                    warnings.warn(f"skipping checkpoint: {e}; trying the previous one", stacklevel=2)
                    print(f"[checkpoint] WARNING: {e}; falling back to the previous checkpoint", flush=True)
                    continue
                choice = str(ckpt)
                break
        choice = broadcast_object(choice)
        return Path(choice) if choice else None

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
