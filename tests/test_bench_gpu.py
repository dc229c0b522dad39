"""scripts/bench_gpu.py on a CPU with the tiny shape: it completes and reports every number (the
GPU run itself needs a GPU; see the script's docstring)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_gpu.py"


def test_bench_gpu_runs_on_a_cpu_and_reports_every_number(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--prompt-tokens", "6"]
    cmd += ["--new-tokens", "6", "--streams", "3", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    for side in (report["hf"], report["swarm"]["waves"]):
        assert set(side) == {"1", "3"}
        for n, point in side.items():
            for key in ("wall_s", "ttft_ms", "ms_per_token", "tok_s"):
                assert math.isfinite(point[key]) and point[key] > 0, (n, key, point)
            assert point["tokens"] == int(n) * 6
    peers = report["peers"]
    assert [p["layers"] for p in peers] == ["0:2", "2:4", "4:6", "6:8"]
    assert all(p["share_bytes"] > 0 and p["process_bytes"] > 0 for p in peers)
    assert sum(p["share_bytes"] for p in peers) == report["model_bytes"]  # the shares tile the model
    assert all(p["cuda_graphs"] is None for p in peers)  # off on a CPU
    assert [type(g["pass"]) for g in report["goals"]] == [bool, bool]
    assert all(math.isfinite(g["ratio"]) and g["ratio"] > 0 for g in report["goals"])
    lines = done.stdout.splitlines()
    assert sum(line.startswith(("GOAL PASS", "GOAL FAIL")) for line in lines) == 2
    assert sum(line.startswith(("HF generate", "LayerSwarm, 4 peers")) for line in lines) == 4


def test_bench_gpu_names_the_wheels_a_gpu_image_lacks():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--wheels"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    command = done.stdout.strip()
    assert command.startswith("python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12")
    for name in ("transformers==", "fastapi==", "uvicorn==", "pydantic==", "cryptography==", "llguidance=="):
        assert f" {name}" in command, name
