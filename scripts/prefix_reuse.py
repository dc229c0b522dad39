"""Time to first token of requests that share a long system prompt, on a swarm that reuses the
prefix's KV cache and on one started with --no-prefix-reuse."""

import argparse
import math
import random
import shlex
import time
from collections import Counter

import httpx

from inference import Tokenizer
from scripts.swarm_load import REQUEST_TIMEOUT_S, median, start_swarm

PREFIX_TARGET_TOKENS = 500
PREFIX_REQUESTS_PER_RUN = 5

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


def prefix_scenario(args: argparse.Namespace, model_id: str, tokenizer: Tokenizer, reuse_entry: str) -> dict:
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
