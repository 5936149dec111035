"""`titanforge svf export CHECKPOINT --out FILE`: the z-vectors of an SVF run as one small
safetensors file (an "expert" of Transformer², trainer/svf.py), readable with
`finetune.z_from=FILE` or `titanforge.trainer.svf.read_z`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def export_z(ckpt: str | Path, out: str | Path, task: str = "") -> tuple[Path, int]:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from titanforge.trainer.svf import save_z

    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / ".metadata").exists():
        raise ValueError(f"{ckpt} is not a titanforge checkpoint (no .metadata); give a checkpoints/step_N directory")
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    keys = sorted(k for k in meta if k.startswith("model.") and k.endswith(".z"))
    if not keys:
        raise ValueError(f"{ckpt} holds no z-vectors: it was not trained with finetune.method=svf")
    state = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    zs = {k[len("model."):-len(".z")]: v for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_z(out, zs, {"task": task, "checkpoint": str(ckpt)})
    return out, sum(v.numel() for v in zs.values())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="titanforge svf", description="Transformer² z-vector experts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a checkpoint's z-vectors as a safetensors file")
    e.add_argument("checkpoint", help="a checkpoints/step_N directory of a finetune.method=svf run")
    e.add_argument("--out", required=True, help="output file (.safetensors)")
    e.add_argument("--task", default="", help="task name recorded in the file's metadata")
    args = p.parse_args(argv)
    try:
        path, n = export_z(args.checkpoint, args.out, args.task)
    except ValueError as err:
        print(f"titanforge svf: {err}", file=sys.stderr)
        return 2
    print(f"[svf] {args.checkpoint} -> {path} ({n} z values)")
    return 0
