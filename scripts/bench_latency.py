"""Benchmark: per-token latency of a 3-peer swarm of the default model, at 0 ms and at a WAN
delay per hop (every peer behind a delay proxy), with and without speculative decoding, on
draftable prompts (repeat a passage, edit given code, summarize) and a novel one (a story);
monolithic transformers on the same prompts in the same run, alternating, medians.

    python scripts/bench_latency.py [--runs 3] [--max-tokens 64] [--delays 0,20] [--pinned]

--pinned measures the layout of scripts/pinned_layout.py instead: two peers (0:15, 15:30, or --pinned-split), each on
a core of its own with one thread, against the monolithic model on one core with one thread.
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

from bench_swarm import monolithic_run as monolithic_ttft_and_decode  # noqa: E402

from inference import Tokenizer, resolve_model  # noqa: E402
from inference.whole_model import load_whole_model  # noqa: E402
from scripts.machine import cpu_model  # noqa: E402
from scripts.pinned_layout import (  # noqa: E402
    add_pinned_flag,
    check_pinned,
    describe,
    on_one_core,
    pinned_cores,
    start_pinned_swarm,
)
from tests.peers.processes import Swarm  # noqa: E402

PASSAGE = (
    "The lighthouse stood on the northern cliff for two hundred years. Every night its keeper climbed "
    "the ninety steps, trimmed the wick, polished the great lens and watched the fishing boats pass "
    "safely into the harbour below. In winter the storms came from the west, and the waves broke so "
    "high against the rocks that the spray reached the lamp room windows. The keeper wrote every ship "
    "and every storm into a leather logbook that his grandfather had started."
)
CODE = """def total_price(items, tax_rate):
    total = 0
    for item in items:
        total = total + item["price"] * item["quantity"]
    total = total + total * tax_rate
    return round(total, 2)


def cheapest(items):
    best = None
    for item in items:
        if best is None or item["price"] < best["price"]:
            best = item
    return best
"""
PROMPTS = {
    "repeat": f"Repeat this passage exactly, word for word:\n\n{PASSAGE}",
    # (asked "rename ... and return the whole code", the default model answered in prose: no edit)
    "edit code": f"Here is a Python function:\n\n{CODE}\nRewrite this code with the variable `total` renamed to "
    "`amount`. Reply with the code only.",
    "summarize": f"Summarize this passage in two sentences, reusing its words:\n\n{PASSAGE}",
    "story": "Write a short story about a dragon who is afraid of the dark.",
}
NOVEL = {"story"}


def chat_ids(tokenizer: Tokenizer, content: str) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": content}])


def monolithic_run(model, ids: list[int], max_tokens: int) -> float:
    """Decode seconds per token with transformers' own KV cache, greedy."""
    return monolithic_ttft_and_decode(model, ids, max_tokens)[1]


def swarm_run(
    entry: str, model_id: str, content: str, max_tokens: int, speculative: bool
) -> tuple[float, float]:
    """(decode seconds per token, acceptance of drafts) through the OpenAI API: a 1-token
    request gives the time to the first token, a max_tokens request minus it the decode steps."""

    def timed(n: int) -> float:
        body = {
            "model": model_id,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": n,
            "temperature": 0,
            "ignore_eos": True,
            "speculative": speculative,
        }
        t0 = time.perf_counter()
        r = httpx.post(f"http://{entry}/v1/chat/completions", json=body, timeout=600)
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == n, r.json()["usage"]
        return elapsed

    before = httpx.get(f"http://{entry}/health").json()["speculation"]
    ttft = timed(1)
    per_token = (timed(max_tokens) - ttft) / (max_tokens - 1)
    after = httpx.get(f"http://{entry}/health").json()["speculation"]
    drafted = after["drafted"] - before["drafted"]
    return per_token, (after["accepted"] - before["accepted"]) / drafted if drafted else 0.0


def start_swarm(model: str, split: list[str], delay_ms: float, peer_args: list[str], pinned: bool) -> Swarm:
    if pinned:
        swarm, why = start_pinned_swarm(model, tuple(split), peer_args, "bench-latency-", delay_ms or None)
        if why is not None:
            swarm.stop()
            raise RuntimeError(f"the pinned swarm did not start: {why}")
        return swarm
    log_dir = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    swarm = Swarm(model, log_dir, peer_args, threads=None)  # threads as users run them
    for layers in split:
        swarm.add(layers, delay_ms=delay_ms if delay_ms else None)
    swarm.wait_ready(timeout_s=300)
    swarm.wait_route(swarm.peers[0])
    return swarm


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", default=None, help="layer spans (default 0:10,10:20,20:30)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--delays", default="0,20", help="one-way ms per hop, comma-separated")
    parser.add_argument("--prompts", default=",".join(PROMPTS), help="which prompt kinds, comma-separated")
    parser.add_argument("--peer-args", default="", help="extra `peer serve` flags, e.g. --no-direct-return")
    add_pinned_flag(parser)
    args = parser.parse_args()
    if args.pinned and args.split is not None:
        parser.error("--pinned has its own split (--pinned-split): leave out --split")
    check_pinned(parser, args)
    args.split = ",".join(args.pinned_split) if args.pinned else args.split or "0:10,10:20,20:30"
    unknown = set(args.prompts.split(",")) - set(PROMPTS)
    if unknown:
        parser.error(f"unknown prompt kinds {sorted(unknown)}; choose from {', '.join(PROMPTS)}")
    return args


def measure(
    args: argparse.Namespace, delay: float, model, tokenizer: Tokenizer, model_id: str
) -> tuple[list, list]:
    """One swarm with `delay` ms per hop, every prompt kind against the monolithic model:
    (rows, paths), a row (delay, kind, mono s/token, plain s/token, speculative s/token,
    acceptance) per kind and a path (delay, layers, mean ms per step of each phase, the entry's
    direct-return counters) per peer."""
    rows, paths = [], []
    swarm = start_swarm(args.model, args.split.split(","), delay, args.peer_args.split(), args.pinned)
    core = pinned_cores()[0] if args.pinned else None  # the monolithic model's one core
    try:
        entry = swarm.peers[0].address  # the client talks to the entry directly; hops pay the delay
        swarm_run(entry, model_id, PROMPTS["story"], 8, True)  # warm up
        with on_one_core(core):
            monolithic_run(model, chat_ids(tokenizer, PROMPTS["story"]), 8)
        for kind in args.prompts.split(","):
            content, samples = PROMPTS[kind], []
            ids = chat_ids(tokenizer, content)
            for _ in range(args.runs):  # alternate, so that machine noise hits all alike
                with on_one_core(core):
                    mono = monolithic_run(model, ids, args.max_tokens)
                plain, _ = swarm_run(entry, model_id, content, args.max_tokens, False)
                spec, rate = swarm_run(entry, model_id, content, args.max_tokens, True)
                samples.append((mono, plain, spec, rate))
            med = [statistics.median(s[i] for s in samples) for i in range(4)]
            rows.append((delay, kind, *med))
            print(f"  {delay:g} ms {kind}: {[round(x * 1e3, 1) for x in med[:3]]} ms/token", flush=True)
        for peer in swarm.peers:  # where the steps' time went on each hop (all runs at this delay)
            health = httpx.get(f"{peer.url}/health").json()
            paths.append((delay, health["layers"], health["hop_path_ms"], health["direct_return"]))
    finally:
        swarm.stop()
    return rows, paths


def report(args: argparse.Namespace, model_id: str, rows: list, paths: list) -> None:
    """The table of every delay and prompt, where each peer's time went, and the goal per delay."""
    split = args.split.split(",")
    print(
        f"\nmodel {model_id}, split {args.split}, {args.max_tokens} new tokens (greedy), median of "
        f"{args.runs} runs; {cpu_model()}; peer flags: {args.peer_args or 'defaults'}"
        + (f"; {describe(args.pinned_split)}" if args.pinned else "")
    )
    head = (
        f"{'delay':>6} {'prompt':<10} {'mono ms/tok':>11} {'swarm':>8} {'swarm+spec':>10} {'spec tok/s':>10} "
    )
    print(head + f"{'accept':>7} {'spec/plain':>10} {'spec/mono':>9} {'plain/mono':>10}")
    for delay, kind, mono, plain, spec, rate in rows:
        print(
            f"{delay:>4g}ms {kind:<10} {mono * 1e3:11.1f} {plain * 1e3:8.1f} {spec * 1e3:10.1f} {1 / spec:10.1f} "
            f"{rate:7.0%} {spec / plain:10.2f} {spec / mono:9.2f} {plain / mono:10.2f}"
        )
    print("\nwhere a step's time goes on each peer (mean ms per step over all runs of a delay):")
    for delay, layers, phases, direct in paths:
        text = ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
        print(
            f"  {delay:g} ms, layers {layers[0]}:{layers[1]}: {text}; entry's mean step {direct['mean_step_ms']} ms"
        )
    legs = len(split)  # one traversal with direct return: entry -> ... -> last -> entry
    nested = 2 * (len(split) - 1)  # today's nested replies: every hop's leg is paid twice
    for delay in sorted({r[0] for r in rows if r[0] > 0}):
        zero = {r[1]: r for r in rows if r[0] == 0}
        for r in (r for r in rows if r[0] == delay and r[1] in zero):
            compute = zero[r[1]][3]
            print(
                f"{delay:g} ms, {r[1]}: swarm {r[3] * 1e3:.1f} ms/token against the goal of {legs} legs x {delay:g} ms "
                f"+ compute {compute * 1e3:.1f} ms + 10% = {(legs * delay / 1e3 + compute) * 1.1e3:.1f} ms "
                f"(nested replies pay {nested} legs: {(nested * delay / 1e3 + compute) * 1e3:.1f} ms)"
            )


def main() -> int:
    args = parse_args()
    if args.pinned:  # one thread, as each pinned peer has
        torch.set_num_threads(1)
    source = resolve_model(args.model)
    model = load_whole_model(source.path, torch.float32)
    tokenizer = Tokenizer(source.path)
    rows, paths = [], []
    for delay in [float(d) for d in args.delays.split(",")]:
        more_rows, more_paths = measure(args, delay, model, tokenizer, source.model_id)
        rows += more_rows
        paths += more_paths
    report(args, source.model_id, rows, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
