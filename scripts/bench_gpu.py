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
cryptography or llguidance, and its transformers (5.17 when last read) is older than the 5.24
the blocks need. Those travel as wheels, made on the development machine:

    echo /.whl/ >> .git/info/exclude
    python scripts/bench_gpu.py --wheels | sh      # into .whl/ (CPython 3.12, x86-64; 24 MB)

and the device run names `.whl` in `carry` and runs (one command, about 5 minutes for 8b on an
H100: start, install, build and save 16 GB, generate, 4 peers):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
    PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --out $OUT/bench_gpu.json 2>&1 | tee $OUT/log

The script checks these imports first and stops at once, naming what is missing.
"""

import argparse
import asyncio
import gc
import importlib.util
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {
    "8b": dict(  # Llama-3-8B
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=1024,
    ),
}
# What a peer needs beyond the GPU image (device KINDS.md), with the versions installed here.
WHEELS = [
    "transformers",
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "opentelemetry-api",
    "uvicorn",
    "cryptography",
    "cffi",
    "pycparser",
    "llguidance",
]
NEEDED_IMPORTS = ("torch", "transformers", "safetensors", "httpx", "xxhash", "fastapi", "uvicorn")
NEEDED_IMPORTS += ("pydantic", "cryptography", "llguidance")
MIN_TRANSFORMERS = (5, 24)
START_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 600.0
GOAL_LATENCY_X = 5.0  # 4 peers' per-token decode vs HF generate batch 1
GOAL_STREAMS_X = 10.0  # N streams' aggregate tokens/s vs one stream's


def wheels_command() -> str:
    pins = []
    for name in WHEELS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    platforms = " ".join(
        f"--platform {p}"
        for p in [f"manylinux_2_{n}_x86_64" for n in (35, 34, 31, 28, 27, 24, 17)]
        + ["manylinux2014_x86_64", "manylinux1_x86_64"]
    )
    return (
        "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
        f"{platforms} -d .whl {' '.join(pins)}"
    )


def missing_packages() -> list[str]:
    missing = [name for name in NEEDED_IMPORTS if importlib.util.find_spec(name) is None]
    try:
        have = tuple(int(x) for x in version("transformers").split(".")[:2])
        if have < MIN_TRANSFORMERS:
            missing.append(
                f"transformers>={'.'.join(map(str, MIN_TRANSFORMERS))} (found {version('transformers')})"
            )
    except (PackageNotFoundError, ValueError):
        pass
    return missing


# --- the model -------------------------------------------------------------------------------


def byte_tokenizer(vocab_size: int):
    """A tokenizer of one token per character (printable ASCII, then fillers), no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[chr(32 + i) if i < 95 else f"<x{i}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_model(shape: str, device, dtype, path: Path):
    """A random Llama of `shape`, initialised on the device, saved to `path` with a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    model.save_pretrained(path, max_shard_size="5GB")
    byte_tokenizer(config.vocab_size).save_pretrained(path)
    return model


def spans(layers: int, peers: int) -> list[tuple[int, int]]:
    cuts = [round(i * layers / peers) for i in range(peers + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def share_bytes(path: Path, start: int, end: int, total: int) -> int:
    """Bytes of the checkpoint's tensors that layers [start, end) load (as saved)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    every = set()  # the names of all shards (embed_tokens and lm_head may sit in different ones)
    for file in files:
        with safe_open(file, framework="pt") as f:
            every.update(f.keys())
    size = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name.startswith("model.layers."):
                    mine = start <= int(name.split(".")[2]) < end
                elif name.startswith("model.embed_tokens."):
                    mine = start == 0 or (end == total and "lm_head.weight" not in every)
                else:  # model.norm, lm_head
                    mine = end == total
                if mine:
                    t = f.get_slice(name)
                    size += math.prod(t.get_shape()) * _dtype_bytes(t.get_dtype())
    return size


def _dtype_bytes(name: str) -> int:
    return {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}.get(name, 4)


# --- (a) HF generate -------------------------------------------------------------------------


def hf_generate(model, prompts: list[list[int]], new_tokens: int, device) -> dict:
    import torch

    ids = torch.tensor(prompts, device=device)

    def timed(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,  # EOS ignored, as the swarm's side does
            do_sample=False,
            pad_token_id=0,
        )
        _sync(device)
        assert out.shape == (len(prompts), ids.shape[1] + n), f"generate gave {tuple(out.shape)}"
        return time.perf_counter() - t0

    first, whole = timed(1), timed(new_tokens)
    return {
        "batch": len(prompts),
        "tokens": len(prompts) * new_tokens,
        "wall_s": whole,
        "ttft_ms": 1000 * first,
        "ms_per_token": 1000 * (whole - first) / max(1, new_tokens - 1),
        "tok_s": len(prompts) * new_tokens / whole,
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- (b) the swarm ---------------------------------------------------------------------------


async def one_stream(client, url: str, body: dict) -> dict:
    stamps, tokens, error = [], None, None
    t0 = time.perf_counter()
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"{r.status_code}: {r.text[:300]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = str(event["error"])[:300]
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event.get("choices") or []):
                stamps.append(time.perf_counter())
    if error or not stamps:
        return {"error": error or "no tokens"}
    tokens = tokens if tokens is not None else len(stamps)
    decode = (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else math.nan
    return {"tokens": tokens, "ttft_s": stamps[0] - t0, "decode_s": decode}


async def wave(entry: str, model_id: str, prompts: list[list[int]], new_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        body = dict(model=model_id, max_tokens=new_tokens, temperature=0, ignore_eos=True, stream=True)
        body |= dict(stream_options={"include_usage": True}, speculative=False)
        url = f"http://{entry}/v1/completions"
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(one_stream(client, url, body | {"prompt": p}) for p in prompts))
        wall = time.perf_counter() - t0
    errors = [s["error"] for s in streams if "error" in s]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(streams)} streams failed: {errors[0]}")
    tokens = sum(s["tokens"] for s in streams)
    return {
        "streams": len(prompts),
        "tokens": tokens,
        "wall_s": wall,
        "ttft_ms": 1000 * statistics.median(s["ttft_s"] for s in streams),
        "ms_per_token": 1000 * statistics.median(s["decode_s"] for s in streams),
        "tok_s": tokens / wall,
    }


def run_swarm(args, model_dir: Path, layer_spans, prompts, log_dir: Path, extra: list[str]) -> dict:
    """Start the peers, run the waves (each once unmeasured), read their memory; stop them."""
    import httpx

    from tests.peers.processes import Swarm

    peer_args = (["--device", "cuda", "--dtype", "bfloat16"] if args.device == "cuda" else []) + extra
    swarm = Swarm(model_dir, log_dir, peer_args, threads=2 if args.device == "cuda" else 1)
    try:
        t0 = time.perf_counter()
        for a, b in layer_spans:
            swarm.add(f"{a}:{b}")
        swarm.wait_ready(timeout_s=START_TIMEOUT_S)
        swarm.wait_route(swarm.peers[0], timeout_s=START_TIMEOUT_S)
        started = time.perf_counter() - t0
        entry = swarm.peers[0].address
        model_id = httpx.get(f"http://{entry}/v1/models", timeout=10).json()["data"][0]["id"]
        results = {}
        for n in (1, args.streams):
            chosen = prompts[:n]
            asyncio.run(wave(entry, model_id, chosen, args.new_tokens))  # warm-up: graphs are captured
            runs = [asyncio.run(wave(entry, model_id, chosen, args.new_tokens)) for _ in range(args.runs)]
            results[str(n)] = _median_run(runs)
        peers = [_peer_memory(peer, args.device) for peer in swarm.peers]
        return {"start_s": started, "waves": results, "peers": peers}
    finally:
        swarm.stop()


def _median_run(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key in ("wall_s", "ttft_ms", "ms_per_token", "tok_s"):
        out[key] = statistics.median(r[key] for r in runs)
    return out | {"runs": len(runs)}


# --- (c) memory --------------------------------------------------------------------------------


def _peer_memory(peer, device: str) -> dict:
    health = peer.health() or {}
    pid = peer.proc.pid
    process = _gpu_process_bytes(pid) if device == "cuda" else _rss_bytes(pid)
    return {
        "layers": peer.layers,
        "pid": pid,
        "weights_bytes": health.get("weights_bytes"),
        "process_bytes": process,
        "process_memory": "device (nvidia-smi)" if device == "cuda" else "resident (RSS)",
        "cuda_graphs": health.get("cuda_graphs"),
    }


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gpu_process_bytes(pid: int) -> int | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        for line in out.splitlines():
            p, mib = (x.strip() for x in line.split(","))
            if int(p) == pid:
                return int(mib) << 20
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid:
                    return proc.usedGpuMemory
    except Exception:  # no NVML, or a container that hides other processes
        pass
    return None


# --- report ------------------------------------------------------------------------------------


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


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from scripts.machine import cpu_model

    return cpu_model()


def main(argv: list[str] | None = None) -> int:
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
    phases = {}
    rng = random.Random(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.streams)]
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
    shape = SHAPES[args.shape]
    report = {
        "title": (
            f"bench_gpu: shape {args.shape} (hidden {shape['hidden_size']}, {total} layers, "
            f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, vocab {vocab}), "
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
        "model_bytes": model_bytes,
        "hf": hf,
        "swarm": {"start_s": swarm["start_s"], "waves": swarm["waves"]},
        "swarm_eager": eager and {"start_s": eager["start_s"], "waves": eager["waves"]},
        "peers": swarm["peers"],
        "phases_s": phases,
    }
    report["goals"] = goals(report)
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
