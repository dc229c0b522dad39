"""Benchmark: what checking costs. Two identical local swarms of the default model (peers 0:10,
10:20, 10:20, 20:30: the middle layers have two replicas), whose entries differ only in
--verify-rate (0 and the rate measured), get the same load of concurrent greedy completions,
alternating, side by side in one run. Throughput is the tokens streamed per second in steady
state (--streams clients sending one request after another; tokens counted over --window s after
--warmup s); the cost is 1 - checked / unchecked, the median over --runs rounds.

    python scripts/bench_verify.py [--rate 0.05] [--runs 3] [--streams 8] [--window 60]
        [--max-tokens 32] [--json PATH]

The entry checks exactly `rate` of its requests (one in 20 at 0.05): in each of those, the
other replica of 10:20 recomputes that hop at every step on the same input (a shadow), hops
commit to their outputs, and the entry compares them before releasing a token. The spans assume
a 30-layer model (the default).
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scripts.machine import cores, cpu_name  # noqa: E402
from scripts.swarm_load import prompts_for  # noqa: E402
from tests.peers.processes import Swarm, wait_until  # noqa: E402

SPANS = ("0:10", "10:20", "10:20", "20:30")


def start(model: str, rate: float, threads: int | None) -> Swarm:
    swarm = Swarm(model, Path(tempfile.mkdtemp(prefix="bench-verify-")), threads=threads)
    swarm.add(SPANS[0], args=["--verify-rate", str(rate)])
    for span in SPANS[1:]:
        swarm.add(span)
    return swarm


def ready(swarm: Swarm) -> bool:
    entry = swarm.peers[0]
    rows = entry.table()["peers"] if entry.health() else []
    return sum(r["vouched"] and r["status"] == "serving" for r in rows) == len(SPANS)


async def steady(
    entry: str,
    model: str,
    prompts: list[str],
    streams: int,
    max_tokens: int,
    warmup_s: float,
    window_s: float,
) -> float:
    """Tokens per second in steady state: `streams` clients each send streamed requests one
    after another (cycling through `prompts`); content deltas are counted between warmup_s and
    warmup_s + window_s (requests still running at the end are drained, not counted)."""
    t0 = time.perf_counter()
    start, end = t0 + warmup_s, t0 + warmup_s + window_s
    counted = 0
    turn = 0

    async def worker(client: httpx.AsyncClient):
        nonlocal counted, turn
        while time.perf_counter() < end:
            prompt = prompts[turn % len(prompts)]
            turn += 1
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            async with client.stream(
                "POST", f"http://{entry}/v1/chat/completions", json=body, timeout=600
            ) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content") and start <= time.perf_counter() < end:
                        counted += 1

    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(worker(client) for _ in range(streams)))
    return counted / window_s


def alternate(args: argparse.Namespace, plain: Swarm, checked: Swarm, prompts: list[str]) -> list[dict]:
    """Steady-state tokens per second of both swarms, run after run (the order alternating, so
    that machine noise hits both alike): per run, both rates and the cost of checking."""
    rows = []
    for run in range(args.runs):
        order = (plain, checked) if run % 2 == 0 else (checked, plain)
        rates = {}
        for swarm in order:
            rates[swarm is checked] = asyncio.run(
                steady(
                    swarm.peers[0].address,
                    args.model,
                    prompts,
                    args.streams,
                    args.max_tokens,
                    args.warmup,
                    args.window,
                )
            )
        cost = 1 - rates[True] / rates[False]
        rows.append({"unchecked_tok_s": rates[False], "checked_tok_s": rates[True], "cost": cost})
        print(
            f"run {run + 1}: unchecked {rates[False]:.1f} tok/s, checked {rates[True]:.1f} tok/s, "
            f"cost {100 * cost:.1f}%",
            flush=True,
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--window", type=float, default=60.0, help="seconds counted per run and swarm")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before counting starts")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per peer")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}, {cores()} cores; verify-rate {args.rate} against 0", flush=True)
    plain, checked = start(args.model, 0.0, args.threads), start(args.model, args.rate, args.threads)
    try:
        for swarm in (plain, checked):
            wait_until(lambda s=swarm: ready(s), 300, swarm._why)
        before = checked.peers[0].health()["verification"]["requests"]
        rows = alternate(args, plain, checked, prompts_for(32))
        stats = checked.peers[0].health()["verification"]
        checked_requests = stats["requests"] - before
        result = {
            "cpu": cpu_name(),
            "cores": cores(),
            "rate": args.rate,
            "window_s": args.window,
            "streams": args.streams,
            "checked_requests": checked_requests,
            "disagreements": stats["disagreements"],
            "runs": rows,
            "median_cost": statistics.median(r["cost"] for r in rows),
        }
        print(
            f"median cost {100 * result['median_cost']:.1f}% over {args.runs} runs; "
            f"{checked_requests} requests checked, "
            f"{stats['disagreements']} disagreements",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        plain.stop()
        checked.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
