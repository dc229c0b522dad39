"""Peers of the random model on loopback, timed through the OpenAI API (1 and N streamed
completions), and each peer's process memory."""

import asyncio
import json
import math
import statistics
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 600.0


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
