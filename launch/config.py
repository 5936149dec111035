"""The one job config: per-component dataclasses composed into a structured OmegaConf schema.

Order of precedence: schema defaults <- YAML preset <- command-line `key=value` overrides.
This is the only module that touches OmegaConf; below it plain dataclasses travel.
Every problem is raised as `ConfigError` before anything starts, naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from titanforge.data.config import DataConfig
from titanforge.models.config import ModelConfig
from titanforge.parallel.config import ParallelConfig
from titanforge.parallel.mesh import LayoutError, ParallelDims, check_model_layout
from titanforge.parallel.pipeline import check_pipeline_microbatches
from titanforge.parallel.tensor_parallel import check_tp
from titanforge.data.tasks.mixture import check_mixture
from titanforge.trainer.config import (CheckpointConfig, EvalConfig, FinetuneConfig, OptimConfig, TrainConfig,
                                       WandbConfig)


class ConfigError(ValueError):
    """A config problem, with the key and the fix in the message."""


@dataclass
class JobConfig:
    # Where checkpoints, the resolved config, logs and the W&B run directory go.
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # init.from=PATH: start from pretrained weights (a Hugging Face Llama / Jamba directory, a
    # `titanforge export` directory or one of our checkpoints/step_N); "" = random initialisation.
    # A dict because `from` is a Python keyword (trainer/init_from.py).
    init: Dict[str, str] = field(default_factory=lambda: {"from": ""})
    # Long-context suites during training (trainer/evaluate.py).
    eval: EvalConfig = field(default_factory=EvalConfig)
    # finetune.method=svf|lora: train only z-vectors (Transformer²) or LoRA factors (trainer/svf.py).
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        keys.append(name)
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.default_factory is not dataclasses.MISSING
                                                 and dataclasses.is_dataclass(f.default_factory)):
            keys += _all_keys(f.default_factory, name + ".")
    return keys


def _closest(key: str) -> str:
    keys = _all_keys(JobConfig)
    leaf = key.rsplit(".", 1)[-1]
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in keys if k.startswith(parent) and "." not in k[len(parent):]]
    best = difflib.get_close_matches(key, siblings, n=1, cutoff=0.5) or difflib.get_close_matches(
        leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.6)
    if not best:
        return ""
    match = best[0] if "." in best[0] or not parent else parent + best[0]
    if match not in keys:
        match = next((k for k in keys if k.endswith("." + best[0])), best[0])
    return f"; did you mean '{match}'?"


def _translate(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"{source}: unknown config key '{key}'{_closest(key)}")
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"{source}: config key '{key}' has no value; set it with {key}=...")
    if isinstance(err, ValidationError):
        return ConfigError(f"{source}: bad value for '{key}': {msg}")
    return ConfigError(f"{source}: {msg}")


def _yaml_problem(e: Exception) -> str:
    """'YAML syntax error at line L, column C: <problem>; fix the file', one line."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"YAML syntax error{where}: {problem}; fix the file (indentation, a missing ':' or quote)"


def load_config(preset: str | Path | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Schema <- YAML preset <- `key=value` overrides, then cross-field validation."""
    cfg = OmegaConf.structured(JobConfig)
    if preset is not None:
        path = Path(preset)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist; presets live in configs/")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as e:
            raise _translate(e, str(path)) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: {_yaml_problem(e)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=10)")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        # to_object keeps '???' values silently; a missing value must stop the run here.
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError("config keys without a value: " + ", ".join(
                f"'{k}' (set it with {k}=...)" for k in missing))
        job = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _translate(e, "command line" if overrides else str(preset)) from None
    validate(job)
    return job


def validate(job: JobConfig, world_size: int | None = None) -> None:
    """Cross-field checks; raises ConfigError listing every problem with its fix.

    Checks that depend on the number of processes run only when `world_size` is given.
    """
    errs = list(job.model.validate())
    t = job.train
    par = job.parallel
    if par.dp != -1 and par.dp < 1:
        errs.append(f"parallel.dp={par.dp} must be >= 1 (or -1 for world_size / (tp*pp*cp))")
    dp = par.dp if par.dp != -1 else 1
    if world_size is not None:
        # The layout rules live in one place, ParallelDims; its message says what would fit.
        try:
            dims = ParallelDims.from_config(par, world_size)
            dp = dims.dp
            if not job.model.validate():
                errs += check_model_layout(job.model, dims, par)
        except LayoutError as e:
            errs.append(str(e))
    if t.micro_batch_size < 1 or dp < 1:
        pass  # reported by _range_errors / above
    elif t.global_batch_size % (t.micro_batch_size * dp):
        fit = t.micro_batch_size * dp
        errs.append(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                    f"train.micro_batch_size * dp = {t.micro_batch_size} * {dp}; use a multiple of {fit} "
                    f"(e.g. train.global_batch_size={max(fit, (t.global_batch_size // fit) * fit)})")
    elif par.pp > 1 and world_size is not None:
        # The pipeline's micro-batches are the step's accumulation micro-batches.
        errs += check_pipeline_microbatches(par, t.global_batch_size // (t.micro_batch_size * dp))
    if par.cp > 1 and not job.model.validate():
        errs += _check_context(job)
    if par.tp > 1 and not job.model.validate():
        # Heads, kv heads, memory heads, Mamba channels and the vocabulary must split evenly.
        errs += check_tp(job.model, par.tp)
    if t.fused_cross_entropy and (par.tp > 1 or par.pp > 1 or par.dp_backend == "deepspeed"):
        errs.append("train.fused_cross_entropy=true runs the plain layout only (tp = pp = 1, ddp or fsdp): the "
                    "vocabulary-parallel and pipeline losses form logits; set it false for this layout")
    if job.optim.schedule not in ("cosine", "wsd", "constant"):
        errs.append(f"optim.schedule={job.optim.schedule!r} must be cosine | wsd | constant")
    if t.dtype not in ("float32", "bfloat16"):
        errs.append(f"train.dtype={t.dtype!r} must be float32 | bfloat16")
    if job.data.cache_mb < 0:
        errs.append(f"data.cache_mb={job.data.cache_mb} must be >= 0 (0 disables the shard cache)")
    if job.data.on_corrupt not in ("skip", "fail"):
        errs.append(f"data.on_corrupt={job.data.on_corrupt!r} must be skip | fail")
    if job.wandb.mode not in ("offline", "online", "disabled"):
        errs.append(f"wandb.mode={job.wandb.mode!r} must be offline | online | disabled")
    if job.checkpoint.resume not in ("auto", "never"):
        errs.append(f"checkpoint.resume={job.checkpoint.resume!r} must be auto | never")
    unknown = sorted(set(job.init) - {"from"})
    if unknown:
        errs.append(f"init.{unknown[0]} is not a key of init; the only one is init.from=PATH")
    elif job.init.get("from") and par.dp_backend == "deepspeed":
        errs.append("init.from is not supported with parallel.dp_backend=deepspeed; use parallel.dp_backend=fsdp")
    elif job.init.get("from") and not Path(job.init["from"]).is_dir():
        errs.append(f"init.from={job.init['from']} is not a directory; give a Hugging Face checkpoint directory, "
                    f"a `titanforge export` directory or a checkpoints/step_N directory")
    if job.checkpoint.keep_last < 1:
        errs.append(f"checkpoint.keep_last={job.checkpoint.keep_last} must be >= 1")
    errs += _check_tasks(job)
    errs += _range_errors(job)
    errs += _check_finetune(job)
    if errs:
        # One line (a message per problem, '; ' between): what a log or a scheduler shows first.
        raise ConfigError("invalid config: " + "; ".join(" ".join(e.split()) for e in errs))


def _check_finetune(job: JobConfig) -> list[str]:
    ft, par = job.finetune, job.parallel
    if ft.method not in ("none", "svf", "lora"):
        return [f"finetune.method={ft.method!r} must be none | svf | lora"]
    if ft.method == "none":
        return []
    errs = []
    if par.pp > 1 or par.cp > 1 or par.ep > 1 or par.dp_backend == "deepspeed":
        errs.append(f"finetune.method={ft.method} runs with data parallelism (DDP/FSDP2) and tensor parallelism; "
                    f"set parallel.pp=1, parallel.cp=1, parallel.ep=1 and dp_backend ddp or fsdp")
    if ft.method == "lora" and (par.tp > 1 or ft.lora_rank < 1):
        errs.append(f"finetune.method=lora needs parallel.tp=1 and finetune.lora_rank >= 1 (got tp={par.tp}, "
                    f"rank={ft.lora_rank})")
    if ft.z_from and (ft.method != "svf" or not Path(ft.z_from).is_file()):
        errs.append(f"finetune.z_from={ft.z_from} must be a z-vector file (titanforge svf export) with "
                    f"finetune.method=svf")
    return errs


def _range_errors(job: JobConfig) -> list[str]:
    """Values outside their meaningful range, caught here instead of as a late raw error."""
    t, o, c = job.train, job.optim, job.checkpoint
    checks = [
        ("train.steps", t.steps, t.steps >= 1, ">= 1"),
        ("train.global_batch_size", t.global_batch_size, t.global_batch_size >= 1, ">= 1"),
        ("train.micro_batch_size", t.micro_batch_size, t.micro_batch_size >= 1, ">= 1"),
        ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        ("train.val_every", t.val_every, t.val_every >= 0, ">= 0 (0 disables validation)"),
        ("train.val_batches", t.val_batches, t.val_batches >= 1, ">= 1"),
        ("train.max_consecutive_nonfinite", t.max_consecutive_nonfinite, t.max_consecutive_nonfinite >= 1, ">= 1"),
        ("train.seed", t.seed, t.seed >= 0, ">= 0"),
        ("train.peak_tflops", t.peak_tflops, t.peak_tflops >= 0, ">= 0 (0 derives the peak)"),
        ("optim.lr", o.lr, o.lr >= 0 and math.isfinite(o.lr), "a finite number >= 0 (e.g. optim.lr=3e-4)"),
        ("optim.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.beta1", o.beta1, 0 <= o.beta1 < 1, "in [0, 1)"),
        ("optim.beta2", o.beta2, 0 <= o.beta2 < 1, "in [0, 1)"),
        ("optim.eps", o.eps, o.eps > 0, "> 0"),
        ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0"),
        ("optim.decay_fraction", o.decay_fraction, 0 <= o.decay_fraction <= 1, "in [0, 1]"),
        ("optim.grad_clip", o.grad_clip, o.grad_clip >= 0, ">= 0 (0 disables clipping)"),
        ("checkpoint.every", c.every, c.every >= 1, ">= 1 (to save less often, raise it; checkpoint.enabled=false "
                                                   "saves nothing)"),
    ]
    return [f"{key}={value} must be {rule}" for key, value, ok, rule in checks if not ok]


def _check_context(job: JobConfig) -> list[str]:
    """Context-parallel problems: switches it does not compose with, and the data's sequence length
    (when the prepared data is there to read) against the cp split and the model's grids."""
    from titanforge.parallel.context import check_context

    errs = []
    seq_len = None
    try:
        from titanforge.data import read_manifest

        seq_len = read_manifest(job.data.path)["seq_len"]
    except Exception:  # no prepared data yet: the trainer checks again once it has read it
        pass
    return errs + check_context(job.model, job.parallel.cp, seq_len, split=job.parallel.cp_split)


def _check_tasks(job: JobConfig) -> list[str]:
    """The task mixture and the evaluation suites: specs, sizes, and layouts they run on."""
    from titanforge.data.tasks import TASKS, TaskError, parse_spec

    errs = check_mixture(job.data.tasks) if job.data.tasks.names else []
    ev = job.eval
    for key, specs in (("data.tasks.names", job.data.tasks.names), ("eval.suites", ev.suites)):
        for spec in specs:
            try:
                name, _ = parse_spec(spec)
            except TaskError as e:
                errs.append(f"{key}: {e}")
                continue
            if name not in TASKS:
                errs.append(f"{key}: {spec!r} is not a task ({', '.join(TASKS)}); quote specs that hold commas, "
                            f"e.g. {key}=['mqar:pairs=8,values=32']")
    if ev.every < 0 or ev.depths < 1 or ev.samples < 1 or ev.batch_size < 1 or any(n < 2 for n in ev.lengths):
        errs.append(f"eval: every={ev.every} must be >= 0 and depths={ev.depths}, samples={ev.samples}, "
                    f"batch_size={ev.batch_size} >= 1, lengths={list(ev.lengths)} >= 2")
    if ev.lengths and max(ev.lengths) > job.model.max_seq_len:
        errs.append(f"eval.lengths up to {max(ev.lengths)} exceed model.max_seq_len={job.model.max_seq_len}; "
                    f"raise model.max_seq_len")
    uses = (job.data.tasks.names or (ev.every and ev.suites))
    if uses and (job.parallel.pp > 1 or job.parallel.dp_backend == "deepspeed" or job.parallel.cp > 1):
        errs.append("data.tasks and eval suites run on the plain layout (DDP/FSDP with TP), not with "
                    "parallel.pp > 1, parallel.cp > 1 or dp_backend=deepspeed; drop them from this run's config")
    return errs


def to_yaml(job: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(job))


def to_dict(job: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(job)
