"""Benchmark: admission at arrival. Many concurrent long chat prompts through a local 3-peer swarm
(0:10, 10:20, 20:30): how many are served, how many refused (429), how long each refusal took at
the client, and whether any session stays open on a peer afterwards.

    python scripts/bench_admission.py [--model smollm2-135m] [--requests 96] [--prompt-tokens 1174]
        [--max-tokens 32] [--waves 2] [--threads N] [--peer-args '...'] [--json PATH]

Each wave sends --requests non-streamed greedy chat completions at once, each a distinct prompt of
--prompt-tokens tokens (chat template included); the first wave meets an entry that has measured
nothing yet, the later ones one that knows how fast its queue drains. Before them, a wave of the
same requests for a model the swarm does not serve (404 at the door, before any admission) shows
the floor: what the HTTP round trip of that many requests at once costs on this machine. Goal
(issue 25): every refusal within 0.5 s, every accepted request completed, no session left open.
"""

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference import Tokenizer, resolve_model  # noqa: E402
from scripts.swarm_load import chat_bodies, start_swarm, wave_client  # noqa: E402

REFUSAL_GOAL_S = 0.5
FILLER = (
    "The harbour town kept its old customs: boats went out before dawn, the market opened when "
    "they came back, and the council met in the fish hall on the first Monday of each month to "
    "argue about the breakwater, the ferry timetable and the price of diesel."
)


def long_prompts(tokenizer: Tokenizer, n: int, tokens: int) -> list[str]:
    """n distinct user messages whose chat prompts have `tokens` tokens each (to within a few)."""
    words = FILLER.split(" ") * (4 * tokens // len(FILLER.split(" ")) + 8)
    prompts = []
    for i in range(n):
        head = f"Request {i}: summarize this, then say what comes next."
        lo, hi = 0, len(words)
        while lo < hi:  # the most words that keep the prompt within `tokens`
            mid = (lo + hi + 1) // 2
            text = head + " " + " ".join(words[:mid])
            if len(tokenizer.encode_chat([{"role": "user", "content": text}])) <= tokens:
                lo = mid
            else:
                hi = mid - 1
        prompts.append(head + " " + " ".join(words[:lo]))
    return prompts


async def one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/chat/completions", json=body)
    except httpx.HTTPError as e:
        return {"status": type(e).__name__, "s": time.perf_counter() - t0, "error": str(e)[:200]}
    out = {"status": r.status_code, "s": time.perf_counter() - t0}
    if r.status_code == 200:
        out["tokens"] = r.json()["usage"]["completion_tokens"]
    else:
        out["error"] = r.json().get("error", {}).get("message", r.text)[:200]
        out["retry_after"] = r.headers.get("retry-after")
    return out


async def wave(url: str, model: str, prompts: list[str], max_tokens: int) -> list[dict]:
    async with wave_client(len(prompts)) as client:
        bodies = chat_bodies(model, prompts, max_tokens, stream=False)
        return await asyncio.gather(*(one(client, url, b) for b in bodies))


def summary(results: list[dict], max_tokens: int) -> dict:
    served = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    other = [r for r in results if r["status"] not in (200, 429)]
    refusal_s = sorted(r["s"] for r in refused)
    return {
        "served": len(served),
        "refused": len(refused),
        "other": len(other),
        "other_errors": Counter(str(r.get("error"))[:80] for r in other),
        "incomplete": sum(r["tokens"] != max_tokens for r in served),
        "refusal_max_s": max(refusal_s, default=None),
        "refusal_median_s": statistics.median(refusal_s) if refusal_s else None,
        "refusals_over_goal": sum(s > REFUSAL_GOAL_S for s in refusal_s),
        "served_max_s": max((r["s"] for r in served), default=None),
        "served_median_s": statistics.median([r["s"] for r in served]) if served else None,
        "retry_after": Counter(r.get("retry_after") for r in refused),
        "refusal_reasons": Counter(r["error"].split(";")[0].split("(")[0].strip() for r in refused),
    }


def report(k: int, s: dict, sessions: list[int]) -> None:
    def sec(v):
        return "-" if v is None else f"{v:.2f} s"

    print(
        f"wave {k}: served {s['served']}, refused {s['refused']} (429), other {s['other']} "
        f"{dict(s['other_errors']) or ''}; incomplete answers {s['incomplete']}"
    )
    print(
        f"  refusals: max {sec(s['refusal_max_s'])}, median {sec(s['refusal_median_s'])}, over "
        f"{REFUSAL_GOAL_S} s: {s['refusals_over_goal']}; Retry-After {dict(s['retry_after'])}"
    )
    print(f"  served: max {sec(s['served_max_s'])}, median {sec(s['served_median_s'])}")
    print(f"  reasons: {dict(s['refusal_reasons'])}")
    print(f"  sessions open on the peers afterwards: {sessions}")


def open_sessions(swarm, settle_s: float = 10.0) -> list[int]:
    """Each peer's open sessions, once they are all closed or after settle_s."""
    deadline = time.monotonic() + settle_s
    while True:
        counts = [(p.health() or {}).get("sessions", -1) for p in swarm.peers]
        if not any(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--prompt-tokens", type=int, default=1174)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--waves", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per peer")
    ap.add_argument("--peer-args", default="", help="extra `peer serve` arguments, one string")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    path = resolve_model(args.model).path
    prompts = long_prompts(Tokenizer(path), args.requests * args.waves, args.prompt_tokens)
    swarm, why = start_swarm(args.model, args.threads, shlex.split(args.peer_args))
    results = []
    try:
        if why:
            print(why, file=sys.stderr)
            return 1
        url = swarm.peers[0].url
        print(
            f"{args.requests} concurrent chats of {args.prompt_tokens} prompt tokens, {args.max_tokens} out"
        )
        floor = sorted(r["s"] for r in asyncio.run(wave(url, "no-such-model", prompts[: args.requests], 1)))
        print(f"floor (404 at the door): max {floor[-1]:.2f} s, median {statistics.median(floor):.2f} s")
        for k in range(args.waves):
            batch = prompts[k * args.requests : (k + 1) * args.requests]
            s = summary(asyncio.run(wave(url, args.model, batch, args.max_tokens)), args.max_tokens)
            sessions = open_sessions(swarm)
            report(k, s, sessions)
            results.append({**s, "sessions": sessions, "floor_max_s": floor[-1]})
    finally:
        swarm.stop()
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "waves": results}, indent=1)
        )
    ok = all(
        r["refusals_over_goal"] == 0 and not r["incomplete"] and not r["other"] and not any(r["sessions"])
        for r in results
    )
    print("goal met" if ok else "goal NOT met")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
