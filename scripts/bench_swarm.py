"""Benchmark: single-stream decode speed and time to first token of a local swarm against the
monolithic transformers model, side by side in one run, on the same prompt and token count.

    python scripts/bench_swarm.py [--model smollm2-135m] [--runs 5] [--max-tokens 64]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference import Tokenizer, resolve_model  # noqa: E402
from inference.whole_model import load_whole_model  # noqa: E402
from tests.peers.processes import Swarm  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def monolithic_run(model, ids: list[int], max_tokens: int) -> tuple[float, float]:
    """(time to first token s, decode s per token) with transformers' own KV cache, greedy."""
    from transformers import DynamicCache

    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config)
        out = model(torch.tensor([ids]), cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(max_tokens - 1):
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / (max_tokens - 1)


def swarm_run(entry: str, model_id: str, max_tokens: int) -> tuple[float, float]:
    """(time to first token s, decode s per token) through the OpenAI API: a 1-token request
    gives the time to first token, a max_tokens request minus it gives the decode steps."""

    def timed(n: int) -> float:
        body = {"model": model_id, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
        t0 = time.perf_counter()
        r = httpx.post(f"http://{entry}/v1/completions", json=body, timeout=300)
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == n, r.json()["usage"]
        return elapsed

    ttft = timed(1)
    return ttft, (timed(max_tokens) - ttft) / (max_tokens - 1)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", default="0:10,10:20,20:30")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    source = resolve_model(args.model)
    model = load_whole_model(source.path, torch.float32)
    ids = Tokenizer(source.path).encode(PROMPT)
    swarm = Swarm(args.model, Path(tempfile.mkdtemp(prefix="bench-")), threads=None)  # as users run them
    try:
        for layers in args.split.split(","):
            swarm.add(layers)
        swarm.wait_ready(timeout_s=300)
        swarm.wait_route(swarm.peers[0])
        entry = swarm.peers[0].address
        swarm_run(entry, source.model_id, 8)  # warm up both
        monolithic_run(model, ids, 8)
        mono, dist = [], []
        for _ in range(args.runs):  # alternate, so that machine noise hits both alike
            mono.append(monolithic_run(model, ids, args.max_tokens))
            dist.append(swarm_run(entry, source.model_id, args.max_tokens))
    finally:
        swarm.stop()

    def med(rows, i):
        return statistics.median(r[i] for r in rows)

    m_ttft, m_tpot = med(mono, 0), med(mono, 1)
    s_ttft, s_tpot = med(dist, 0), med(dist, 1)
    print(
        f"model {source.model_id}, split {args.split}, prompt {len(ids)} tokens, {args.max_tokens} new tokens, "
        f"median of {args.runs} runs, torch threads {torch.get_num_threads()}"
    )
    print(f"{'':12} {'TTFT ms':>9} {'ms/token':>9} {'tokens/s':>9}")
    print(f"{'monolithic':12} {m_ttft * 1e3:9.1f} {m_tpot * 1e3:9.2f} {1 / m_tpot:9.1f}")
    print(f"{'swarm':12} {s_ttft * 1e3:9.1f} {s_tpot * 1e3:9.2f} {1 / s_tpot:9.1f}")
    print(f"swarm / monolithic: per-token latency {s_tpot / m_tpot:.2f}x, TTFT {s_ttft / m_ttft:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
