"""Benchmark: many concurrent streams through a local swarm against the monolithic transformers
model generating the same prompts as one batch, side by side in one run, alternating; plus time
to first token of requests that share a long system prompt, with and without prefix reuse.

    python scripts/bench_concurrency.py [--model smollm2-135m] [--runs 3] [--streams 1,4,8,16,32]
        [--max-tokens 32] [--entries first|all] [--threads N] [--peer-args '...'] [--no-prefix]
        [--pinned] [--json PATH]

With LAYERSWARM_SWARM_KEY set, the swarm is a private one (every peer-to-peer request signed).

For each concurrency level N, the swarm (3 peers: 0:10, 10:20, 20:30) gets N streamed chat
completions at once (greedy, ignore_eos, distinct prompts of mixed lengths): aggregate tokens/s is
all completion tokens over the wall time of the whole wave; time to first token (first content
delta) and the gaps between content deltas are taken per stream. The monolithic model runs
`generate` on the same N chat prompts, left-padded, as one batch, with as many torch threads as
the machine has cores. Values are medians over --runs runs (percentiles are taken per run).

--pinned measures the layout of scripts/pinned_layout.py instead: two peers (0:15, 15:30, or --pinned-split), each on
a core of its own with one thread, against the monolithic batch on one core with one thread (run
while the swarm is idle); the prefix scenario is left out.
"""

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference import Tokenizer, resolve_model  # noqa: E402
from inference.whole_model import load_whole_model  # noqa: E402
from scripts.machine import cores, cpu_name  # noqa: E402
from scripts.pinned_layout import (  # noqa: E402
    add_pinned_flag,
    check_pinned,
    describe,
    on_one_core,
    pinned_cores,
    start_pinned_swarm,
)
from scripts.prefix_reuse import prefix_scenario  # noqa: E402
from scripts.swarm_load import SPLIT, median, prompts_for, start_swarm, swarm_wave  # noqa: E402

# --- monolithic side ---------------------------------------------------------------------------


def batch_inputs(tokenizer: Tokenizer, prompts: list[str], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-templated prompts, left-padded: (input_ids, attention_mask)."""
    rows = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def monolithic_wave(model, inputs: tuple[torch.Tensor, torch.Tensor], pad_id: int, max_tokens: int) -> dict:
    ids, mask = inputs
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            pad_token_id=pad_id,
        )
        wall = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    tokens = ids.shape[0] * new
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall}


# --- report ----------------------------------------------------------------------------------


def ms(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v * 1e3:.0f}"


def report_table(levels: list[int], results: dict) -> None:
    print(
        "| streams | swarm tok/s | monolithic batched tok/s | ratio | TTFT p50/p95 (ms) | inter-token p50/p95 (ms) | HTTP |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for n in levels:
        r = results[n]
        statuses = " ".join(f"{k}x{v}" for k, v in sorted(r["statuses"].items()))
        print(
            f"| {n} | {r['swarm_tok_s']:.1f} | {r['mono_tok_s']:.1f} | {r['ratio']:.2f} | "
            f"{ms(r['ttft_p50'])}/{ms(r['ttft_p95'])} | {ms(r['itl_p50'])}/{ms(r['itl_p95'])} | {statuses} |"
        )


def goals(results: dict, prefix: dict | None, pinned: bool = False) -> list[dict]:
    out = []

    def goal(name: str, value: float | None, ok: bool | None, detail: str) -> None:
        out.append({"goal": name, "value": value, "pass": ok, "detail": detail})

    if pinned:  # a 2-stage pipeline with both stages busy: close to 2x one core
        for n, least in ((16, 1.7), (8, 1.5)):
            name = f"pinned {n}-stream ratio >= {least}"
            if n in results:
                ratio = results[n]["ratio"]
                goal(name, ratio, ratio >= least, f"swarm/monolithic on one core {ratio:.2f}")
            else:
                goal(name, None, None, f"{n} streams not measured")
        return out
    if 8 in results:
        ratio = results[8]["ratio"]
        goal("8-stream ratio >= 0.9", ratio, ratio >= 0.9, f"swarm/monolithic {ratio:.2f}")
    else:
        goal("8-stream ratio >= 0.9", None, None, "8 streams not measured")
    if 8 in results and 1 in results:
        p8, p1 = results[8]["itl_p95"], results[1]["itl_p95"]
        if math.isnan(p8) or math.isnan(p1):
            goal("8-stream p95 inter-token <= 3x 1-stream p95", None, False, "no inter-token gaps measured")
        else:
            goal(
                "8-stream p95 inter-token <= 3x 1-stream p95",
                p8 / p1,
                p8 <= 3 * p1,
                f"{p8 * 1e3:.0f} ms vs {p1 * 1e3:.0f} ms ({p8 / p1:.2f}x)",
            )
    else:
        goal("8-stream p95 inter-token <= 3x 1-stream p95", None, None, "1 and 8 streams not both measured")
    if prefix is not None:
        if prefix.get("available"):
            r = prefix["ratio"]
            goal("prefix reuse TTFT ratio <= 0.3", r, r <= 0.3, f"{r:.2f}")
        else:
            goal("prefix reuse TTFT ratio <= 0.3", None, None, "prefix reuse not available in this build")
    return out


def parse_args() -> tuple[argparse.Namespace, list[int]]:
    """The options, and the concurrency levels they name."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", default="1,4,8,16,32", help="comma-separated concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--entries",
        choices=("first", "all"),
        default="first",
        help="send every stream to the first peer, or spread them round-robin over all",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per peer (default: the peers choose)"
    )
    parser.add_argument(
        "--peer-args",
        default="",
        help="more arguments for every peer's serve command, e.g. '--omp-wait-policy passive'",
    )
    parser.add_argument(
        "--prefix",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure time to first token with a shared ~500-token system prompt (not with --pinned)",
    )
    add_pinned_flag(parser)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    levels = [int(s) for s in args.streams.split(",") if s.strip()]
    if not levels or min(levels) < 1 or args.runs < 1 or args.max_tokens < 2:
        parser.error("--streams needs levels >= 1, --runs >= 1, --max-tokens >= 2")
    if args.pinned and args.threads is not None:
        parser.error("--pinned gives each peer one core and one thread: leave out --threads")
    check_pinned(parser, args)
    return args, levels


def load_monolithic(name: str, levels: list[int]) -> tuple:
    """The monolithic model, its source and tokenizer, the pad id and each level's batch."""

    source = resolve_model(name)
    model = load_whole_model(source.path, torch.float32)
    tokenizer = Tokenizer(source.path)
    hf_tok = tokenizer._tok
    pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else min(tokenizer.eos_token_ids)
    inputs = {n: batch_inputs(tokenizer, prompts_for(n), pad_id) for n in levels}
    return model, source, tokenizer, pad_id, inputs


def alternate(
    args: argparse.Namespace, levels: list[int], entries: list[str], model_id: str, mono: tuple
) -> tuple[dict, dict]:
    """Every level on both sides, run after run, after a warm-up of both: (swarm runs, monolithic
    runs) per level. `mono` is (model, pad_id, inputs)."""
    model, pad_id, inputs = mono
    core = pinned_cores()[0] if args.pinned else None  # the monolithic model's one core
    swarm_runs = {n: [] for n in levels}
    mono_runs = {n: [] for n in levels}
    warm = max(levels)
    swarm_wave(entries, model_id, prompts_for(warm), 2)  # warm up both
    with on_one_core(core):
        monolithic_wave(model, inputs[warm], pad_id, 2)
    for run in range(args.runs):  # alternate, so that machine noise hits both alike
        for n in levels:
            with on_one_core(core):
                mono_runs[n].append(monolithic_wave(model, inputs[n], pad_id, args.max_tokens))
            swarm_runs[n].append(swarm_wave(entries, model_id, prompts_for(n), args.max_tokens))
            s, m = swarm_runs[n][-1], mono_runs[n][-1]
            print(
                f"run {run + 1}/{args.runs}, {n} streams: swarm {s['tok_s']:.1f} tok/s, "
                f"monolithic {m['tok_s']:.1f} tok/s, HTTP {s['statuses']}",
                file=sys.stderr,
                flush=True,
            )
    return swarm_runs, mono_runs


def summarize(levels: list[int], swarm_runs: dict, mono_runs: dict) -> dict:
    """Per level: the medians over runs of both sides, their ratio, and what went wrong."""
    results = {}
    for n in levels:
        sw, mo = swarm_runs[n], mono_runs[n]
        statuses = Counter()
        for r in sw:
            statuses.update(r["statuses"])
        row = {
            "swarm_tok_s": median([r["tok_s"] for r in sw]),
            "mono_tok_s": median([r["tok_s"] for r in mo]),
            **{k: median([r[k] for r in sw]) for k in ("ttft_p50", "ttft_p95", "itl_p50", "itl_p95")},
            "statuses": dict(statuses),
            "short_streams": sum(r["short_streams"] for r in sw),
            "errors": [e for r in sw for e in r["errors"]][:3],
            "swarm_runs": sw,
            "mono_runs": mo,
        }
        row["ratio"] = row["swarm_tok_s"] / row["mono_tok_s"]
        results[n] = row
    return results


def report_prefix(prefix: dict) -> None:
    if prefix["available"]:
        print(
            f"prefix reuse ({prefix['system_prompt_tokens']}-token shared system prompt, "
            f"{prefix['requests_per_side']} requests each, median TTFT): "
            f"with reuse {ms(prefix['ttft_reuse_s'])} ms, without {ms(prefix['ttft_no_reuse_s'])} ms, "
            f"ratio {prefix['ratio']:.2f}; HTTP {prefix['statuses']}"
        )
    else:
        print("prefix reuse: not available in this build")
        if "unrecognized arguments" not in prefix.get("why", ""):
            print(f"  ({prefix.get('why', '').strip()})")
    print()


def report(
    args: argparse.Namespace,
    levels: list[int],
    results: dict,
    prefix: dict | None,
    model_id: str,
    n_cores: int,
) -> list:
    """Print the machine, the table, the prefix scenario and the goals; returns the goals."""
    print()
    print(f"CPU: {cpu_name()}, {n_cores} cores")
    layout = describe(args.pinned_split) if args.pinned else f"peer threads {args.threads or 'peer default'}"
    print(
        f"model {model_id}, split {','.join(args.pinned_split if args.pinned else SPLIT)}, {args.max_tokens} new "
        f"tokens per stream, median of {args.runs} runs, entries {args.entries}, {layout}, "
        f"monolithic torch threads {torch.get_num_threads()}"
    )
    print()
    report_table(levels, results)
    for n in levels:
        if results[n]["short_streams"] or results[n]["errors"]:
            print(
                f"{n} streams: {results[n]['short_streams']} streams short of {args.max_tokens} tokens; "
                f"errors: {results[n]['errors']}"
            )
    print()
    if prefix is not None:
        report_prefix(prefix)
    checks = goals(results, prefix, args.pinned)
    for g in checks:
        verdict = "n/a " if g["pass"] is None else ("PASS" if g["pass"] else "FAIL")
        print(f"goal {verdict} {g['goal']}: {g['detail']}")
    return checks


def write_json(
    path: str,
    args: argparse.Namespace,
    levels: list[int],
    results: dict,
    prefix: dict | None,
    checks: list,
    model_id: str,
    n_cores: int,
) -> None:
    payload = {
        "cpu": cpu_name(),
        "cores": n_cores,
        "model": model_id,
        "split": list(args.pinned_split if args.pinned else SPLIT),
        "pinned": args.pinned,
        "runs": args.runs,
        "max_tokens": args.max_tokens,
        "entries": args.entries,
        "peer_threads": args.threads,
        "monolithic_threads": torch.get_num_threads(),
        "levels": {str(n): results[n] for n in levels},
        "prefix": prefix,
        "goals": checks,
    }
    Path(path).write_text(json.dumps(payload, indent=2, default=str, allow_nan=True) + "\n")


def main() -> int:
    args, levels = parse_args()
    n_cores = cores()
    # the whole machine, as the swarm's peers share all of it; pinned: one core, as each peer has
    torch.set_num_threads(1 if args.pinned else n_cores)
    model, source, tokenizer, pad_id, inputs = load_monolithic(args.model, levels)
    prefix = None
    if args.pinned:
        swarm, why = start_pinned_swarm(
            args.model, args.pinned_split, shlex.split(args.peer_args), "bench-concurrency-"
        )
    else:
        swarm, why = start_swarm(args.model, args.threads, shlex.split(args.peer_args))
    try:
        if why is not None:
            print(f"the swarm did not start: {why}", file=sys.stderr)
            return 1
        entries = [p.address for p in swarm.peers] if args.entries == "all" else [swarm.peers[0].address]
        swarm_runs, mono_runs = alternate(args, levels, entries, source.model_id, (model, pad_id, inputs))
        if args.prefix and not args.pinned:
            prefix = prefix_scenario(args, source.model_id, tokenizer, swarm.peers[0].address)
    finally:
        swarm.stop()
    results = summarize(levels, swarm_runs, mono_runs)
    checks = report(args, levels, results, prefix, source.model_id, n_cores)
    if args.json:
        write_json(args.json, args, levels, results, prefix, checks, source.model_id, n_cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
