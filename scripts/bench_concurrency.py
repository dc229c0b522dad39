"""Benchmark: many concurrent streams through a local swarm against the monolithic transformers
model generating the same prompts as one batch, side by side in one run, alternating; plus time
to first token of requests that share a long system prompt, with and without prefix reuse.

    python scripts/bench_concurrency.py [--model smollm2-135m] [--runs 3] [--streams 1,4,8,16,32]
        [--max-tokens 32] [--entries first|all] [--threads N] [--peer-args '...'] [--no-prefix]
        [--json PATH]

With LAYERSWARM_SWARM_KEY set, the swarm is a private one (every peer-to-peer request signed).

For each concurrency level N, the swarm (3 peers: 0:10, 10:20, 20:30) gets N streamed chat
completions at once (greedy, ignore_eos, distinct prompts of mixed lengths): aggregate tokens/s is
all completion tokens over the wall time of the whole wave; time to first token (first content
delta) and the gaps between content deltas are taken per stream. The monolithic model runs
`generate` on the same N chat prompts, left-padded, as one batch, with as many torch threads as
the machine has cores. Values are medians over --runs runs (percentiles are taken per run).
"""

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference import Tokenizer, resolve_model  # noqa: E402
from tests.peers.processes import Swarm  # noqa: E402

SPLIT = ("0:10", "10:20", "20:30")
START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 600.0
PREFIX_TARGET_TOKENS = 500
PREFIX_REQUESTS_PER_RUN = 5

# Distinct user messages of mixed lengths: short questions, instructions, and a few long ones.
_LONG_TEXT = (
    "The city council met on Tuesday evening to discuss the proposed expansion of the public "
    "library. Supporters argued that the current building is too small for the growing number of "
    "children's programs, that the reading rooms are crowded every afternoon, and that the "
    "computer lab has a waiting list most days of the week. Opponents worried about the cost, "
    "which the architects estimate at four million dollars, and about the loss of parking spaces "
    "behind the building. After two hours of public comment the council voted to commission a "
    "detailed study of both the costs and the alternatives, to be presented next spring."
)
PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
    "Give me a synonym for 'happy'.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "Explain what a prime number is to a ten-year-old.",
    "List five fruits that are red.",
    "What does a compiler do?",
    "Suggest a name for a small bakery in a mountain village.",
    "Describe the water cycle in two sentences.",
    "What are the main differences between a cat and a dog as pets?",
    "Write a limerick about a programmer who never sleeps.",
    "Give me three tips for staying focused while studying for an exam at home.",
    "Explain how a bicycle stays upright when it is moving, without using equations.",
    "I am planning a weekend trip to the seaside with two children aged six and nine. "
    "What should I pack, and what activities would you suggest if it rains?",
    "Write the opening paragraph of a mystery novel set in a lighthouse during a storm.",
    "My tomato plants have yellow leaves at the bottom and the fruit is small. The garden gets "
    "sun all afternoon and I water every evening. What could be wrong and how do I fix it?",
    "Compare trains and airplanes for a 500 kilometre journey in terms of time, cost, comfort "
    "and environmental impact, and say which you would choose.",
    "Write a short, friendly email to a colleague asking to move our Thursday meeting to Friday "
    "morning because I have a dentist appointment.",
    "Summarize the following text in one sentence: " + _LONG_TEXT,
    "Read this news report and list the arguments on each side: " + _LONG_TEXT,
    "Here is a paragraph from a local newspaper. " + _LONG_TEXT + " Write a headline for it.",
    "Explain recursion with an example in Python, and then explain when a loop is a better choice "
    "than recursion and why deep recursion can fail in Python.",
    "Pretend you are a tour guide in Rome. In a few sentences, welcome a group of tourists and "
    "tell them what they will see today, from the Colosseum to the Trevi Fountain.",
    "A farmer has 17 sheep. All but 9 run away. How many sheep does the farmer have left? "
    "Explain your reasoning step by step.",
    "Write a product description for a waterproof hiking backpack with a 30 litre capacity, a "
    "rain cover, padded shoulder straps and a pocket for a water bladder.",
    "What is the difference between weather and climate? Give one example of each, and explain "
    "why a cold winter does not disprove global warming.",
    "Tell me a bedtime story about a small robot who is afraid of the dark, in about five "
    "sentences, with a happy ending.",
]

QUESTIONS = [
    "How many vacation days do new employees get?",
    "Who approves expenses above the limit?",
    "Can I work from home on Fridays?",
    "What should I do if I lose my badge?",
    "When are timesheets due?",
    "How do I book a meeting room?",
    "What is the policy on personal phone calls?",
    "Who do I contact about a broken laptop?",
]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, q in [0, 100]; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def prompts_for(n: int) -> list[str]:
    """n distinct user messages (cycled through PROMPTS, marked when they repeat)."""
    return [
        PROMPTS[i % len(PROMPTS)] + (f" (variant {i // len(PROMPTS)})" if i >= len(PROMPTS) else "")
        for i in range(n)
    ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- swarm side ------------------------------------------------------------------------------


async def one_stream(client: httpx.AsyncClient, entry: str, body: dict) -> dict:
    """One streamed chat completion: status, time to first content delta, gaps between deltas,
    completion tokens (from the usage chunk, else the number of deltas), error if any."""
    result = {"status": None, "ttft": None, "gaps": [], "tokens": 0, "error": None}
    stamps: list[float] = []
    usage_tokens = None
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", f"http://{entry}/v1/chat/completions", json=body) as r:
            result["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                result["error"] = r.text[:200]
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result["error"] = str(event["error"])[:200]
                    continue
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        stamps.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result["error"] = f"{type(e).__name__}: {e}"[:200]
        if result["status"] is None:
            result["status"] = type(e).__name__
    if stamps:
        result["ttft"] = stamps[0] - t0
        result["gaps"] = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    result["tokens"] = usage_tokens if usage_tokens is not None else len(stamps)
    return result


async def swarm_wave_async(entries: list[str], model_id: str, prompts: list[str], max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        bodies = [
            {
                "model": model_id,
                "messages": [{"role": "user", "content": p}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            for p in prompts
        ]
        t0 = time.perf_counter()
        streams = await asyncio.gather(
            *(one_stream(client, entries[i % len(entries)], b) for i, b in enumerate(bodies))
        )
        wall = time.perf_counter() - t0
    ok = [s for s in streams if s["status"] == 200 and not s["error"]]
    ttfts = [s["ttft"] for s in ok if s["ttft"] is not None]
    gaps = [g for s in ok for g in s["gaps"]]
    tokens = sum(s["tokens"] for s in streams)
    statuses = Counter(
        str(s["status"]) + ("+error" if s["status"] == 200 and s["error"] else "") for s in streams
    )
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tok_s": tokens / wall if wall > 0 else math.nan,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "itl_p50": percentile(gaps, 50),
        "itl_p95": percentile(gaps, 95),
        "statuses": dict(statuses),
        "short_streams": sum(1 for s in ok if s["tokens"] != max_tokens),
        "errors": [s["error"] for s in streams if s["error"]][:3],
    }


def swarm_wave(entries: list[str], model_id: str, prompts: list[str], max_tokens: int) -> dict:
    return asyncio.run(swarm_wave_async(entries, model_id, prompts, max_tokens))


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


# --- swarm start-up ------------------------------------------------------------------------


def start_swarm(model: str, threads: int | None, args: list[str] = ()) -> tuple[Swarm, str | None]:
    """A 3-peer swarm with a complete route from every peer; (swarm, None) when it serves, or
    (swarm, why) when a peer failed to start (the swarm must still be stopped)."""
    log_dir = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    swarm = Swarm(model, log_dir, args=list(args), threads=threads)
    for layers in SPLIT:
        swarm.add(layers)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        dead = [p for p in swarm.peers if not p.alive()]
        if dead:
            return swarm, f"peer {dead[0].address} exited:\n{dead[0].log_tail(10)}"
        try:
            if all(p.health() for p in swarm.peers) and all(not p.table()["gaps"] for p in swarm.peers):
                return swarm, None
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    return swarm, f"no complete route within {START_TIMEOUT_S:.0f} s:\n{swarm._why()}"


# --- prefix reuse ----------------------------------------------------------------------------


def shared_system_prompt(tokenizer: Tokenizer, target: int = PREFIX_TARGET_TOKENS) -> tuple[str, int]:
    """Deterministic filler (an office handbook) of about `target` tokens; (text, tokens)."""
    rng = random.Random(20240601)
    subjects = [
        "Every employee",
        "A team lead",
        "The finance office",
        "A visitor",
        "Each contractor",
        "The night shift",
        "A new hire",
        "The facilities team",
    ]
    verbs = [
        "must record",
        "should review",
        "may request",
        "has to confirm",
        "is expected to report",
        "needs to archive",
        "can postpone",
        "will receive",
    ]
    objects = [
        "travel expenses",
        "meeting room bookings",
        "security badges",
        "overtime hours",
        "software licences",
        "parking permits",
        "training budgets",
        "equipment loans",
    ]
    conditions = [
        "before the end of each month",
        "within two working days",
        "through the intranet form",
        "after approval by a manager",
        "unless the office is closed",
        "at the front desk",
        "in the shared calendar",
        "by email to the helpdesk",
    ]
    lines = ["You are the assistant of the Northwind office. Answer questions using the handbook below."]
    n = 0
    while len(tokenizer.encode("\n".join(lines))) < target:
        n += 1
        lines.append(
            f"Rule {n}: {rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} "
            f"{rng.choice(conditions)}."
        )
    text = "\n".join(lines)
    return text, len(tokenizer.encode(text))


def prefix_ttft(entry: str, model_id: str, system: str, question_no: int) -> tuple[float, int | str]:
    body = {
        "model": model_id,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Question {question_no}: {QUESTIONS[question_no % len(QUESTIONS)]}"},
        ],
        "max_tokens": 1,
        "temperature": 0,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    try:
        r = httpx.post(f"http://{entry}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    except httpx.HTTPError as e:
        return math.nan, type(e).__name__
    elapsed = time.perf_counter() - t0
    return (elapsed if r.status_code == 200 else math.nan), r.status_code


def prefix_scenario(args, model_id: str, tokenizer: Tokenizer, reuse_entry: str) -> dict:
    """Sequential 1-token requests sharing a ~500-token system prompt, after one warm-up request,
    on the normal swarm vs one started with --no-prefix-reuse; alternating, every run."""
    system, system_tokens = shared_system_prompt(tokenizer)
    result = {"system_prompt_tokens": system_tokens, "available": False}
    plain, why = start_swarm(args.model, args.threads, [*shlex.split(args.peer_args), "--no-prefix-reuse"])
    try:
        if why is not None:
            result["why"] = why
            if "unrecognized arguments" in why or "unrecognized arguments" in plain._why():
                result["why"] = "peers do not know --no-prefix-reuse (unrecognized arguments)"
            return result
        plain_entry = plain.peers[0].address
        prefix_ttft(reuse_entry, model_id, system, 0)  # warm-up: the shared prefix is now known
        prefix_ttft(plain_entry, model_id, system, 0)
        with_reuse, without, statuses = [], [], Counter()
        q = 1
        for _ in range(args.runs):
            for _ in range(PREFIX_REQUESTS_PER_RUN):
                t, s = prefix_ttft(reuse_entry, model_id, system, q)
                with_reuse.append(t)
                statuses[f"reuse {s}"] += 1
                t, s = prefix_ttft(plain_entry, model_id, system, q)
                without.append(t)
                statuses[f"no-reuse {s}"] += 1
                q += 1
        result.update(
            available=True,
            ttft_reuse_s=median(with_reuse),
            ttft_no_reuse_s=median(without),
            requests_per_side=len(with_reuse),
            statuses=dict(statuses),
        )
        result["ratio"] = result["ttft_reuse_s"] / result["ttft_no_reuse_s"]
        return result
    finally:
        plain.stop()


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


def goals(results: dict, prefix: dict | None) -> list[dict]:
    out = []

    def goal(name: str, value: float | None, ok: bool | None, detail: str) -> None:
        out.append({"goal": name, "value": value, "pass": ok, "detail": detail})

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


def main() -> int:
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
        help="also measure time to first token with a shared ~500-token system prompt",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    levels = [int(s) for s in args.streams.split(",") if s.strip()]
    if not levels or min(levels) < 1 or args.runs < 1 or args.max_tokens < 2:
        parser.error("--streams needs levels >= 1, --runs >= 1, --max-tokens >= 2")

    from transformers import AutoModelForCausalLM

    n_cores = cores()
    torch.set_num_threads(n_cores)  # the whole machine, as the swarm's peers share all of it
    source = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    tokenizer = Tokenizer(source.path)
    hf_tok = tokenizer._tok
    pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else min(tokenizer.eos_token_ids)
    inputs = {n: batch_inputs(tokenizer, prompts_for(n), pad_id) for n in levels}

    swarm_runs = {n: [] for n in levels}
    mono_runs = {n: [] for n in levels}
    prefix = None
    swarm, why = start_swarm(args.model, args.threads, shlex.split(args.peer_args))
    try:
        if why is not None:
            print(f"the swarm did not start: {why}", file=sys.stderr)
            return 1
        entries = [p.address for p in swarm.peers] if args.entries == "all" else [swarm.peers[0].address]
        warm = max(levels)
        swarm_wave(entries, source.model_id, prompts_for(warm), 2)  # warm up both
        monolithic_wave(model, inputs[warm], pad_id, 2)
        for run in range(args.runs):  # alternate, so that machine noise hits both alike
            for n in levels:
                mono_runs[n].append(monolithic_wave(model, inputs[n], pad_id, args.max_tokens))
                swarm_runs[n].append(swarm_wave(entries, source.model_id, prompts_for(n), args.max_tokens))
                s, m = swarm_runs[n][-1], mono_runs[n][-1]
                print(
                    f"run {run + 1}/{args.runs}, {n} streams: swarm {s['tok_s']:.1f} tok/s, "
                    f"monolithic {m['tok_s']:.1f} tok/s, HTTP {s['statuses']}",
                    file=sys.stderr,
                    flush=True,
                )
        if args.prefix:
            prefix = prefix_scenario(args, source.model_id, tokenizer, swarm.peers[0].address)
    finally:
        swarm.stop()

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

    print()
    print(f"CPU: {cpu_model()}, {n_cores} cores")
    print(
        f"model {source.model_id}, split {','.join(SPLIT)}, {args.max_tokens} new tokens per stream, "
        f"median of {args.runs} runs, entries {args.entries}, peer threads {args.threads or 'peer default'}, "
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
    checks = goals(results, prefix)
    for g in checks:
        verdict = "n/a " if g["pass"] is None else ("PASS" if g["pass"] else "FAIL")
        print(f"goal {verdict} {g['goal']}: {g['detail']}")

    if args.json:
        payload = {
            "cpu": cpu_model(),
            "cores": n_cores,
            "model": source.model_id,
            "split": list(SPLIT),
            "runs": args.runs,
            "max_tokens": args.max_tokens,
            "entries": args.entries,
            "peer_threads": args.threads,
            "monolithic_threads": torch.get_num_threads(),
            "levels": {str(n): results[n] for n in levels},
            "prefix": prefix,
            "goals": checks,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str, allow_nan=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
