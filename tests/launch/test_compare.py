"""`titanforge compare`: validation losses of runs side by side at their common steps."""

import json

from titanforge.launch.cli import main as titanforge


def write_run(path, vals, extra_steps=()):
    path.mkdir()
    rows = [{"step": s, "loss": 9.0} for s in range(1, 5)]
    rows += [{"step": s, "val_loss": v, "val_ppl": 0.0} for s, v in vals.items()]
    rows += [{"step": s, "val_loss": 1.0} for s in extra_steps]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_prints_common_steps_side_by_side(tmp_path, capsys):
    write_run(tmp_path / "titans-mac", {20: 6.5, 40: 6.01234}, extra_steps=[60])
    write_run(tmp_path / "llama", {20: 6.7, 40: 6.25})
    assert titanforge(["compare", str(tmp_path / "titans-mac"), str(tmp_path / "llama")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["val", "loss", "titans-mac", "llama"]
    assert out[1].split() == ["step", "20", "6.5000", "6.7000"]
    assert out[2].split() == ["step", "40", "6.0123", "6.2500"]
    assert len(out) == 4 and out[3].startswith("[compare] step 40: lowest validation loss titans-mac")


def test_compare_errors_name_the_fix(tmp_path, capsys):
    assert titanforge(["compare", str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().out
    write_run(tmp_path / "a", {20: 6.0})
    write_run(tmp_path / "b", {30: 6.0})
    assert titanforge(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "same train.val_every" in capsys.readouterr().out
