#!/usr/bin/env bash
# The GPU check of issue #19, under 8 minutes on one H100: (1) the gpu-marked tests (bf16 kernels
# against float64 references, the Titans memory chain among them), (2) bench/kernels.py (each
# kernel, titans_memory included, vs its PyTorch path, fla and
# mamba-ssm where installed, CUDA events, GB/s and TFLOP/s vs roofline), (3) bench/gpu_step.py (one
# training step per family at ~350M, tokens/s and MFU). Writes bench/results/gpu_check.json naming
# the GPU, with each part's results or its error, so a partial run still reports.
# Time limits per part (120 + 150 + 180 s) keep the whole under 8 minutes.
#
#     bash bench/gpu_check.sh            (from the repository root; PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=bench/results
TMP=$(mktemp -d)
mkdir -p "$OUT"
unset TRITON_INTERPRET
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

start=$(date +%s)
timeout 120 env TRITON_INTERPRET=0 "$PY" -P -m pytest -q -m gpu tests/kernels tests/models \
    -p no:cacheprovider --junitxml="$TMP/tests.xml" > "$TMP/tests.log" 2>&1
tests_rc=$?
tail -5 "$TMP/tests.log"
timeout 150 "$PY" bench/kernels.py --repeats 10 --out "$TMP/kernels.json" 2>&1 | tee "$TMP/kernels.log"
timeout 180 "$PY" bench/gpu_step.py --steps 3 --out "$TMP/gpu_step.json" 2>&1 | tee "$TMP/gpu_step.log"
end=$(date +%s)

"$PY" - "$TMP" "$tests_rc" "$((end - start))" <<'PYEOF'
import json, subprocess, sys
from datetime import datetime, timezone
from pathlib import Path

tmp, rc, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def part(name):
    f = tmp / f"{name}.json"
    if f.exists():
        return json.loads(f.read_text())
    log = tmp / f"{name}.log"
    return {"error": "no results; log tail: " + (log.read_text()[-2000:] if log.exists() else "none")}

gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": "bash bench/gpu_check.sh",
          "gpu": gpu or "unknown", "commit": commit, "seconds": seconds,
          "gpu_tests": {"exit_code": rc, "log_tail": (tmp / "tests.log").read_text()[-3000:]},
          "kernels": part("kernels"), "train_step": part("gpu_step")}
Path("bench/results/gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(f"wrote bench/results/gpu_check.json ({gpu}, {seconds} s)")
PYEOF
