"""Config errors fail before anything starts and name the key and the fix."""

import textwrap
from pathlib import Path

import pytest

from titanforge.launch.config import ConfigError, JobConfig, load_config, validate
from titanforge.parallel import LayoutError, ParallelDims
from titanforge.parallel.config import ParallelConfig

PRESET = str(Path(__file__).resolve().parents[2] / "configs" / "llama-tiny.yaml")


def test_defaults_and_overrides_are_typed():
    job = load_config(None, ["data.path=d", "model.d_model=96", "optim.lr=1e-3", "wandb.tags=[a,b]"])
    assert isinstance(job, JobConfig)
    assert job.model.d_model == 96 and job.optim.lr == 1e-3 and job.wandb.tags == ["a", "b"]


def test_preset_then_override_precedence(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  steps: 7\n  micro_batch_size: 2\nmodel:\n  n_layers: 3\n")
    job = load_config(preset, ["train.steps=9", "data.path=d"])
    assert (job.train.steps, job.train.micro_batch_size, job.model.n_layers) == (9, 2, 3)


def test_mistyped_key_names_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.d_modle'.*did you mean 'model\.d_model'"):
        load_config(None, ["model.d_modle=3"])


def test_mistyped_key_in_yaml_names_file(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("optim:\n  warmup_step: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'optim\.warmup_step'.*'optim\.warmup_steps'"):
        load_config(preset)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"bad value for 'train\.steps'.*'abc'"):
        load_config(None, ["data.path=d", "train.steps=abc"])


def test_missing_value_names_key(tmp_path):
    preset = tmp_path / "m.yaml"
    preset.write_text(textwrap.dedent("""\
        model:
          d_model: 64
        """))
    with pytest.raises(ConfigError, match=r"without a value: 'data\.path' \(set it with data\.path="):
        load_config(preset)
    assert load_config(preset, ["data.path=somewhere"]).data.path == "somewhere"


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["data.path=d", "train.steps"])


def test_missing_preset_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/preset.yaml")


def test_batch_not_divisible_by_dp_spells_out_fix():
    job = load_config(None, ["data.path=d", "train.global_batch_size=12", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"global_batch_size=12 is not divisible by .* 4 \* 2; use a multiple of 8"):
        validate(job, world_size=2)


def test_heads_not_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"model\.n_heads=4 is not divisible by parallel\.tp=3; tp must divide it \(tp in \[1, 2, 4\]\)"):
        load_config(None, ["model.n_heads=4", "model.d_model=64", "parallel.tp=3", "data.path=d"])


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=d", "model.d_model=100", "model.n_heads=3", "optim.schedule=linear", "train.dtype=fp16"])
    msg = str(err.value)
    assert "d_model=100 is not divisible by model.n_heads=3" in msg
    assert "optim.schedule='linear'" in msg and "train.dtype='fp16'" in msg


@pytest.mark.parametrize("cfg,world,pattern", [
    (ParallelConfig(dp=3), 4, r"dp\*tp\*pp\*cp = 3\*1\*1\*1 = 3 != world size 4; set parallel\.dp=4"),
    (ParallelConfig(tp=3), 4, r"world size 4 is not divisible by tp\*pp\*cp = 3"),
    (ParallelConfig(pp=2, pp_schedule="zb"), 2, r"parallel\.pp_schedule='zb' is unknown; choose one of 1f1b, "
     r"interleaved_1f1b, gpipe"),
    (ParallelConfig(pp=2, pp_schedule="interleaved_1f1b"), 2, r"interleaved_1f1b needs parallel\.pp_virtual_stages "
     r">= 2 .* set parallel\.pp_virtual_stages=2"),
    (ParallelConfig(pp=2, pp_virtual_stages=2), 2, r"pp_schedule=1f1b runs one stage per rank but "
     r"parallel\.pp_virtual_stages=2; set parallel\.pp_virtual_stages=1 or parallel\.pp_schedule=interleaved_1f1b"),
    (ParallelConfig(dp_backend="deepspeed", tp=2), 4, r"dp_backend=deepspeed runs pure data parallelism .*tp=2 .*"
     r"Use parallel\.dp_backend=fsdp .* or set tp=1"),
    (ParallelConfig(dp_backend="deepspeed", zero_stage=0), 2, r"parallel\.zero_stage=0 must be 1, 2 or 3"),
    (ParallelConfig(dp_backend="zero"), 2, r"parallel\.dp_backend='zero' must be ddp \| fsdp \| deepspeed"),
    (ParallelConfig(tp=2), 4, r"tp=2 with dp=2 needs parallel\.dp_backend=fsdp"),
])
def test_impossible_layouts_rejected(cfg, world, pattern):
    with pytest.raises(LayoutError, match=pattern):
        ParallelDims.from_config(cfg, world)


def test_dp_minus_one_takes_the_rest():
    assert ParallelDims.from_config(ParallelConfig(), 4).dp == 4
    assert ParallelDims.from_config(ParallelConfig(pp=2), 4).dp == 2
    assert ParallelDims.from_config(ParallelConfig(tp=2, dp_backend="fsdp"), 4).dp == 2
    assert ParallelDims.from_config(ParallelConfig(dp_backend="deepspeed", zero_stage=3), 2).dp == 2


@pytest.mark.parametrize("family,override,pattern", [
    ("ttt", "model.ttt.inner=foo", r"model\.ttt\.inner='foo'"),
    ("titans", "model.titans.variant=foo", r"model\.titans\.variant='foo'"),
])
def test_family_sections_are_checked_before_start(family, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, ["data.path=d", f"model.family={family}", override])
    # Another family's section is not checked when it is not the one chosen.
    load_config(None, ["data.path=d", "model.family=llama", override])


def test_cli_rejects_a_bad_layout_before_launching(capsys):
    from titanforge.launch.cli import main

    # 3 processes cannot hold tp=2: the CLI says so before torchrun starts anything.
    rc = main(["train", PRESET, "--nproc", "3", "parallel.tp=2"])
    assert rc == 2
    assert "world size 3 is not divisible by tp*pp*cp = 2" in capsys.readouterr().err


def test_cli_flags_and_overrides_in_any_order(capsys):
    from titanforge.launch.cli import main

    rc = main(["train", PRESET, "train.steps=abc", "--nproc", "2", "optim.lr=1"])
    assert rc == 2
    assert "bad value for 'train.steps'" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,pattern", [
    # More stages than layers: pp x virtual stages counts every stage.
    (["model.n_layers=2", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"],
     r"parallel\.pp=2 x parallel\.pp_virtual_stages=2 = 4 pipeline stages but the model has 2 layers"),
    # The pipeline's micro-batches are the accumulation micro-batches: 4 / (4 * 1) = 1 < pp.
    (["parallel.pp=2", "train.global_batch_size=4", "train.micro_batch_size=4"],
     r"1f1b needs at least pp=2 micro-batches per step, got 1 .*raise train\.global_batch_size"),
    (["model.n_layers=4", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
      "train.global_batch_size=6", "train.micro_batch_size=2"],
     r"interleaved_1f1b needs the micro-batches per step \(3\) to be a multiple of pp=2"),
])
def test_pipeline_layouts_checked_before_start(overrides, pattern):
    job = load_config(None, ["data.path=d", *overrides])
    with pytest.raises(ConfigError, match=pattern):
        validate(job, world_size=2)


@pytest.mark.parametrize("cfg,world,pattern", [
    (ParallelConfig(ep=3), 4, r"parallel\.ep=3 must divide the data-parallel degree dp=4 .*choose ep in \[1, 2, 4\]"),
    (ParallelConfig(ep=2, tp=2, dp_backend="fsdp"), 8, r"parallel\.ep=2 with parallel\.tp=2 is not available: "
     r"expert parallelism runs with data parallelism only .*set parallel\.tp=1 or parallel\.ep=1"),
    (ParallelConfig(ep=2, pp=2), 4, r"parallel\.ep=2 with parallel\.pp=2 is not available.*set parallel\.pp=1 or "
     r"parallel\.ep=1"),
])
def test_impossible_expert_parallel_layouts_rejected(cfg, world, pattern):
    with pytest.raises(LayoutError, match=pattern):
        ParallelDims.from_config(cfg, world)


def test_expert_parallel_layouts_accepted():
    assert ParallelDims.from_config(ParallelConfig(ep=2), 2).ep == 2
    assert ParallelDims.from_config(ParallelConfig(ep=2, dp_backend="fsdp"), 4).dp == 4


@pytest.mark.parametrize("overrides,pattern", [
    (["model.family=jamba", "model.jamba.moe.n_experts=6", "model.jamba.moe.top_k=2", "parallel.ep=4"],
     r"parallel\.ep=4 does not divide the 6 experts \(model\.jamba\.moe\.n_experts\); choose ep in \[1, 2\]"),
    (["model.family=llama", "parallel.ep=2"],
     r"parallel\.ep=2 but model\.family='llama' has no mixture-of-experts layers; set parallel\.ep=1"),
    (["model.family=jamba", "model.jamba.layer_pattern=MD AD", "parallel.ep=2"],
     r"parallel\.ep=2 but model\.jamba\.layer_pattern='MD AD' has no mixture-of-experts layer"),
])
def test_expert_parallel_model_checked_before_start(overrides, pattern):
    job = load_config(None, ["data.path=d", "train.global_batch_size=16", *overrides])
    with pytest.raises(ConfigError, match=pattern):
        validate(job, world_size=4)
    # The same layout fits a model with MoE layers and an expert count that ep divides.
    if "model.family=jamba" in overrides:
        fixed = [o for o in overrides if not o.startswith(("model.jamba.layer_pattern", "model.jamba.moe.n_experts"))]
        validate(load_config(None, ["data.path=d", "train.global_batch_size=16", *fixed]), world_size=4)
