"""`titanforge export CHECKPOINT --out DIR`: a sharded checkpoint as one set of weights, on CPU.

CHECKPOINT is a `checkpoints/step_N` directory of any layout (DCP reshards on read). Llama and
Jamba are written as Hugging Face safetensors + config.json (`LlamaForCausalLM` /
`JambaForCausalLM.from_pretrained(DIR)` load them: models/llama/hf.py, models/jamba/hf.py);
Titans and TTT, which Hugging Face does not have, as `model.safetensors` under our own names plus
the run's `config.yaml`. Either directory is a valid `init.from=DIR`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    from titanforge.launch.config import load_config
    from titanforge.models.registry import build_model
    from titanforge.parallel.init import init_model_weights
    from titanforge.trainer.init_from import _dcp_source, load_model_weights

    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / ".metadata").exists() or not (ckpt / "config.yaml").exists():
        raise ValueError(f"{ckpt} is not a titanforge checkpoint (no .metadata / config.yaml); give a "
                         f"checkpoints/step_N directory of a run")
    job = load_config(ckpt / "config.yaml", ["init.from=''"])
    model = build_model(job.model, device="meta").to_empty(device="cpu")
    init_model_weights(model, job.model, 0)  # buffers (rotary tables); every parameter is read below
    load_model_weights(model, _dcp_source(ckpt), ckpt)
    family = job.model.family
    if family == "llama":
        from titanforge.models.llama.hf import export_hf

        return export_hf(model, out)
    if family == "jamba":
        from titanforge.models.jamba.hf import export_hf

        return export_hf(model, out)
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(ckpt / "config.yaml", out / "config.yaml")
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="titanforge export",
                                description="Write a checkpoint's model as safetensors (Hugging Face for Llama/Jamba).")
    p.add_argument("checkpoint", help="a checkpoints/step_N directory")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out)
    except ValueError as e:
        print(f"titanforge export: {e}", file=sys.stderr)
        return 2
    print(f"[export] {args.checkpoint} -> {path}")
    return 0
