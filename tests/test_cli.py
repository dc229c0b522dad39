"""The `peer` command fails on bad input with one line and a non-zero exit, no traceback."""

import subprocess
import sys

import pytest


def run_peer(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "peers.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", "0:2,2:9"], "layers 2:9 are not a non-empty range inside [0, 4)"),
        (["--split", "0:2,2:2"], "layers 2:2 are not a non-empty range"),
        (["--split", "0:1,2:4"], "do not tile [0, 4) in order"),
    ],
)
def test_bad_layer_split(tiny_llama, args, message):
    done = run_peer("generate", "hi", "--model", str(tiny_llama), *args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"peer: error: {message}" or message in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_model():
    done = run_peer("generate", "hi", "--model", "no-such-model")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "peer: error: unknown model 'no-such-model'" in done.stderr


def test_generate_prints_text(tiny_llama):
    done = run_peer("generate", "hi", "--model", str(tiny_llama), "--split", "0:3,3:4", "--max-tokens", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
