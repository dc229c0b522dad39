"""A local 3-peer swarm under many concurrent streamed chat completions: the prompts, starting the
swarm, sending one wave of streams and the statistics of a wave (shared by the benchmarks)."""

import asyncio
import json
import math
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.peers.processes import Swarm

SPLIT = ("0:10", "10:20", "20:30")
START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 600.0

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


def wave_client(requests: int) -> httpx.AsyncClient:
    """A client for `requests` requests at once."""
    limits = httpx.Limits(max_connections=requests + 8, max_keepalive_connections=requests + 8)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0))


def chat_bodies(model_id: str, prompts: list[str], max_tokens: int, stream: bool) -> list[dict]:
    """Greedy chat completions of `prompts`, each `max_tokens` long (ignore_eos)."""
    streamed = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    return [
        {
            "model": model_id,
            "messages": [{"role": "user", "content": p}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            **streamed,
        }
        for p in prompts
    ]


async def swarm_wave_async(entries: list[str], model_id: str, prompts: list[str], max_tokens: int) -> dict:
    async with wave_client(len(prompts)) as client:
        bodies = chat_bodies(model_id, prompts, max_tokens, stream=True)
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


def start_swarm(model: str, threads: int | None, args: list[str] = ()) -> tuple[Swarm, str | None]:
    """A 3-peer swarm with a complete route from every peer; (swarm, None) when it serves, or
    (swarm, why) when a peer failed to start (the swarm must still be stopped)."""
    log_dir = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    swarm = Swarm(model, log_dir, args=list(args), threads=threads)
    for layers in SPLIT:
        swarm.add(layers)
    return swarm, start_problem(swarm)


def start_problem(swarm: Swarm) -> str | None:
    """Wait until every peer of `swarm` serves and has a complete route: None, or why not (a
    peer exited, or no complete route within START_TIMEOUT_S)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        dead = [p for p in swarm.peers if not p.alive()]
        if dead:
            return f"peer {dead[0].address} exited:\n{dead[0].log_tail(10)}"
        try:
            if all(p.health() for p in swarm.peers) and all(not p.table()["gaps"] for p in swarm.peers):
                return None
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    return f"no complete route within {START_TIMEOUT_S:.0f} s:\n{swarm._why()}"
