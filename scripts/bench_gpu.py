"""Benchmark for a GPU: a random-weight model of a real shape (Llama-3-8B) built on the device,
HF transformers `generate` at batch 1 and N, against 4 LayerSwarm peers (separate processes on
loopback, same device) at 1 and N streams, and each peer's memory against its share.

    python scripts/bench_gpu.py [--shape 8b|tiny] [--device cuda|cpu] [--prompt-tokens 32]
        [--new-tokens 128] [--streams 16] [--peers 4] [--runs 1] [--eager-too]
        [--peer-args '...'] [--out PATH]
    python scripts/bench_gpu.py --wheels    # the packages a GPU machine's image lacks, as a pip command

Defaults: on CUDA the 8b shape in bfloat16, elsewhere the tiny shape in float32 (what CI runs).
The model is built on the device and saved as safetensors in a temporary folder (no weights
travel). Prompts are random token ids, the same for both sides; decoding is greedy and ignores
EOS. Measured, in one run:
  (a) HF `generate` on the whole model (sdpa attention, its default cache) at batch 1 and N:
      per-token decode latency ((time for T new tokens - time for 1) / (T - 1)) and aggregate
      tokens/s (B x T / time for T);
  (b) 4 peers (`peer serve --layers A:B`, the layers split evenly) through the OpenAI API of the
      first, 1 stream and N concurrent streamed /v1/completions (token-id prompts, temperature
      0, ignore_eos, speculative false: plain decoding): per-token latency (per stream, the
      time between its first and last token over tokens - 1; median over streams) and
      aggregate tokens/s (all completion tokens over the wall time of the wave); each wave runs
      once unmeasured first (CUDA graphs are captured then). --eager-too runs the peers again
      with --cuda-graphs off;
  (c) per peer: its share of the checkpoint (bytes of its tensors as saved), `weights_bytes` of
      its /health where the peer reports it, its process's device memory (nvidia-smi, else
      NVML) on CUDA or resident memory on a CPU, and its CUDA graph counters.
It prints one table and the issue's GPU goals as PASS/FAIL lines (they never fail the run:
4 peers decode >= 5x HF generate batch 1 per token; N = 16 streams >= 10x one stream in
aggregate), and writes everything as JSON (--out).

On this project's GPU machines (/work/.library/device/README.md): the image has torch,
transformers, accelerate, safetensors, httpx and xxhash, but not fastapi, uvicorn, pydantic,
cryptography or llguidance, and its transformers is older than the 5.24 the blocks
need. Those travel as wheels, made on the development machine:

    echo /.whl/ >> .git/info/exclude
    python scripts/bench_gpu.py --wheels | sh      # into .whl/ (CPython 3.12, x86-64)

and the device run names `.whl` in `carry` and runs one command (install, build and save the
model, generate, 4 peers):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
    PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --out $OUT/bench_gpu.json 2>&1 | tee $OUT/log

The script checks these imports first and stops at once, naming what is missing.
"""

import argparse
import gc
import json
import os
import random
import shlex
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from scripts.gpu_image import missing_packages, wheels_command  # noqa: E402
from scripts.gpu_model import SHAPES, build_model, hf_generate, share_bytes, spans  # noqa: E402
from scripts.gpu_swarm import run_swarm  # noqa: E402

GOAL_LATENCY_X = 5.0  # 4 peers' per-token decode vs HF generate batch 1
GOAL_STREAMS_X = 10.0  # N streams' aggregate tokens/s vs one stream's


def goals(report: dict) -> list[dict]:
    n = report["streams"]
    hf1, sw = report["hf"]["1"], report["swarm"]["waves"]
    latency_x = hf1["ms_per_token"] / sw["1"]["ms_per_token"]
    streams_x = sw[str(n)]["tok_s"] / sw["1"]["tok_s"]
    return [
        {
            "goal": f"{len(report['peers'])} peers decode >= {GOAL_LATENCY_X:g}x HF generate batch 1 per token",
            "detail": f"{sw['1']['ms_per_token']:.2f} ms against {hf1['ms_per_token']:.2f} ms",
            "ratio": latency_x,
            "pass": latency_x >= GOAL_LATENCY_X,
        },
        {
            "goal": f"{n} streams >= {GOAL_STREAMS_X:g}x one stream in aggregate",
            "detail": f"{sw[str(n)]['tok_s']:.1f} tokens/s against {sw['1']['tok_s']:.1f}",
            "ratio": streams_x,
            "pass": streams_x >= GOAL_STREAMS_X,
        },
    ]


def print_report(report: dict) -> None:
    mib = 1 << 20
    print(f"\n{report['title']}")
    print(f"{'':34} {'streams':>7} {'ms/token':>9} {'tokens/s':>9} {'first token ms':>15}")
    rows = [("HF generate", report["hf"])]
    rows.append((f"LayerSwarm, {len(report['peers'])} peers", report["swarm"]["waves"]))
    if report.get("swarm_eager"):
        rows.append((f"LayerSwarm, {len(report['peers'])} peers, eager", report["swarm_eager"]["waves"]))
    for label, results in rows:
        for n, r in results.items():
            print(f"{label:34} {n:>7} {r['ms_per_token']:>9.2f} {r['tok_s']:>9.1f} {r['ttft_ms']:>15.1f}")
    print(
        f"\n{'peer layers':>12} {'share MiB':>10} {'weights MiB':>12} {'process MiB':>12} {'x share':>8}  graphs"
    )
    for p in report["peers"]:
        weights = "-" if p["weights_bytes"] is None else f"{p['weights_bytes'] / mib:.1f}"
        proc = "-" if p["process_bytes"] is None else f"{p['process_bytes'] / mib:.1f}"
        ratio = "-" if p["process_bytes"] is None else f"{p['process_bytes'] / p['share_bytes']:.2f}"
        g = p["cuda_graphs"]
        graphs = (
            "off"
            if not g
            else f"{'on' if g['enabled'] else 'FELL BACK'}, {g['replays']} replays of {g['graphs']}"
        )
        print(
            f"{p['layers']:>12} {p['share_bytes'] / mib:>10.1f} {weights:>12} {proc:>12} {ratio:>8}  {graphs}"
        )
    print(f"(process memory: {report['peers'][0]['process_memory']})")
    for g in report["goals"]:
        verdict = "PASS" if g["pass"] else "FAIL"
        print(f"GOAL {verdict}: {g['goal']}: {g['detail']} = {g['ratio']:.2f}x")
    print(f"phases (s): {', '.join(f'{k} {v:.1f}' for k, v in report['phases_s'].items())}")


def describe_device(device: "torch.device") -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from scripts.machine import cpu_model

    return cpu_model()


def options() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 8b on CUDA, else tiny")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if there is one")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=16, help="HF batch and concurrent streams (and 1)")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--runs", type=int, default=1, help="measured waves per point (median)")
    ap.add_argument("--eager-too", action="store_true", help="run the peers again with --cuda-graphs off")
    ap.add_argument("--peer-args", default="", help="more `peer serve` flags for every peer")
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    ap.add_argument("--wheels", action="store_true", help="print the pip command for the GPU image's wheels")
    return ap


def measure(
    args: argparse.Namespace, device: "torch.device", dtype: "torch.dtype", prompts: list[list[int]]
) -> dict:
    """Build and save the model, time HF generate, then the peers (and again eager with
    --eager-too), and each peer's share of the checkpoint; the phases' seconds too."""
    import torch

    phases = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        model_dir = Path(tmp) / f"llama-{args.shape}-random"
        t0 = time.perf_counter()
        model = build_model(args.shape, device, dtype, model_dir)
        phases["build and save"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf_generate(model, prompts[:1], 4, device)  # warm-up
            hf_generate(model, prompts, 4, device)
            hf = {str(n): hf_generate(model, prompts[:n], args.new_tokens, device) for n in (1, args.streams)}
        phases["HF generate"] = time.perf_counter() - t0
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        total = SHAPES[args.shape]["num_hidden_layers"]
        layer_spans = spans(total, args.peers)
        extra = shlex.split(args.peer_args)
        t0 = time.perf_counter()
        swarm = run_swarm(args, model_dir, layer_spans, prompts, Path(tmp), extra)
        phases["swarm"] = time.perf_counter() - t0
        eager = None
        if args.eager_too:
            t0 = time.perf_counter()
            eager = run_swarm(
                args, model_dir, layer_spans, prompts, Path(tmp), [*extra, "--cuda-graphs", "off"]
            )
            phases["swarm, eager"] = time.perf_counter() - t0
        for peer, (a, b) in zip(swarm["peers"], layer_spans, strict=True):
            peer["share_bytes"] = share_bytes(model_dir, a, b, total)
        model_bytes = share_bytes(model_dir, 0, total, total)
    return {"hf": hf, "swarm": swarm, "eager": eager, "phases": phases, "model_bytes": model_bytes}


def build_report(
    args: argparse.Namespace, device: "torch.device", dtype: "torch.dtype", measured: dict
) -> dict:
    """Everything measured, with the run's settings and a title, as the JSON report holds it."""
    import torch

    shape = SHAPES[args.shape]
    swarm, eager = measured["swarm"], measured["eager"]
    report = {
        "title": (
            f"bench_gpu: shape {args.shape} (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
            f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, vocab {shape['vocab_size']}), "
            f"{describe_device(device)}, {str(dtype).removeprefix('torch.')}, prompts of "
            f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.peers} peers"
        ),
        "shape": args.shape,
        "device": args.device,
        "device_name": describe_device(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "streams": args.streams,
        "model_bytes": measured["model_bytes"],
        "hf": measured["hf"],
        "swarm": {"start_s": swarm["start_s"], "waves": swarm["waves"]},
        "swarm_eager": eager and {"start_s": eager["start_s"], "waves": eager["waves"]},
        "peers": swarm["peers"],
        "phases_s": measured["phases"],
    }
    report["goals"] = goals(report)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = options()
    args = ap.parse_args(argv)
    if args.wheels:
        print(wheels_command())
        return 0
    missing = missing_packages()
    if missing:
        print(
            f"bench_gpu: missing {', '.join(missing)}; see this script's docstring (wheels)", file=sys.stderr
        )
        return 2
    if args.new_tokens < 2 or args.streams < 2 or args.prompt_tokens < 1 or args.runs < 1:
        ap.error("--new-tokens and --streams must be >= 2, --prompt-tokens and --runs >= 1")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.shape = args.shape or ("8b" if args.device == "cuda" else "tiny")
    if args.peers < 1 or args.peers > SHAPES[args.shape]["num_hidden_layers"]:
        ap.error(f"--peers must be in 1..{SHAPES[args.shape]['num_hidden_layers']}")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(1)  # on a CPU as each peer (idle OpenMP threads waking cost more than they give)
    rng = random.Random(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.streams)]
    report = build_report(args, device, dtype, measure(args, device, dtype, prompts))
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
