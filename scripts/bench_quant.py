"""Benchmark: what `--quant int8|int4` costs in fidelity and saves in memory, on the default model
(or --model). For each mode against float32, in one process, the prompts run one after another
through the whole model as one block (greedy chat runs, alternating the modes):

- the share of runs whose greedy text is the same as float32's;
- the cosine similarity of the first step's logits with float32's (min and median over prompts);
- weights_bytes of the whole model and of each peer of the 3-peer split, against float32;
- decode ms/token (medians over prompts).

    python scripts/bench_quant.py [--prompts 20] [--tokens 64] [--modes int8,int4] [--threads N]
"""

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from inference import DEFAULT_MODEL, LocalChain, Tokenizer, load_block, resolve_model, weights_bytes  # noqa: E402
from inference.chain import decode_one_token, prefill  # noqa: E402

SPANS = ("0:10", "10:20", "20:30")  # the 3-peer preset (configs/local-smollm2.toml)
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "Give me three tips for a job interview.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short story about a robot who learns to paint.",
    "How do I boil an egg?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What causes the seasons on Earth?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "List five fruits that are rich in vitamin C.",
    "What is a black hole?",
    "Write a limerick about a cat.",
    "How can I improve my sleep?",
    "Explain what a neural network is in simple terms.",
    "What are the three states of matter?",
    "Suggest a name for a coffee shop by the sea.",
    "What should I pack for a weekend hiking trip?",
]


def greedy(chain: LocalChain, ids: list[int], tokens: int, eos: frozenset[int]):
    """(new tokens, the first step's logits [V], decode seconds per token)."""
    session = uuid.uuid4().hex
    try:
        logits = prefill(chain, session, torch.tensor([ids]))  # [1, V]
        first, out, position = logits[0].clone(), [], len(ids)
        started = time.perf_counter()
        for _ in range(tokens):
            token = logits.argmax(-1)  # [1]
            out.append(int(token))
            if int(token) in eos or len(out) == tokens:
                break
            logits = decode_one_token(chain, session, token, position)
            position += 1
        steps = max(1, len(out) - 1)
        return out, first, (time.perf_counter() - started) / steps
    finally:
        chain.close(session)


def memory(path: Path, modes: list[str]) -> dict[str, dict[str, float]]:
    """mode -> {span: weights_bytes quantized / float32} for the whole model and each peer's span."""
    ratios: dict[str, dict[str, float]] = {mode: {} for mode in modes}
    for span in (None, *SPANS):
        base = weights_bytes(load_block(path, span))
        for mode in modes:
            ratios[mode][span or "all"] = weights_bytes(load_block(path, span, quant=mode)) / base
    return ratios


def fidelity(path: Path, modes: list[str], prompts: list[str], tokens: int) -> dict[str, dict]:
    """float32 and each mode on the same prompts: agreement, first-step cosine, ms/token, bytes."""
    tokenizer = Tokenizer(path)
    chains = {mode: LocalChain([load_block(path, quant=mode)]) for mode in ("none", *modes)}
    sizes = {mode: weights_bytes(chain.blocks[0]) for mode, chain in chains.items()}
    runs: dict[str, list] = {mode: [] for mode in chains}
    for prompt in prompts:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        for mode, chain in chains.items():  # alternating: the machine's drift spreads over all modes
            runs[mode].append(greedy(chain, ids, tokens, tokenizer.eos_token_ids))
    texts = {mode: [tokenizer.decode(out) for out, _, _ in rs] for mode, rs in runs.items()}
    report = {
        "none": {
            "ms_per_token": 1000 * statistics.median(s for _, _, s in runs["none"]),
            "bytes": sizes["none"],
        }
    }
    for mode in modes:
        cosines = [
            float(torch.nn.functional.cosine_similarity(q.float(), f.float(), dim=0))
            for (_, q, _), (_, f, _) in zip(runs[mode], runs["none"], strict=True)
        ]
        same = sum(a == b for a, b in zip(texts[mode], texts["none"], strict=True))
        report[mode] = {
            "identical": same / len(prompts),
            "cos_min": min(cosines),
            "cos_median": statistics.median(cosines),
            "ms_per_token": 1000 * statistics.median(s for _, _, s in runs[mode]),
            "bytes": sizes[mode],
        }
    return report


def machine() -> str:
    from scripts.machine import cpu_model

    return f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--modes", default="int8,int4")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model).path
    modes = args.modes.split(",")
    print(f"{args.model}: {args.prompts} chat prompts x {args.tokens} greedy tokens; {machine()}", flush=True)
    report = fidelity(path, modes, PROMPTS[: args.prompts], args.tokens)
    ratios = memory(path, modes)
    print(f"float32: {report['none']['bytes'] / 1e6:.1f} MB, {report['none']['ms_per_token']:.1f} ms/token")
    for mode in modes:
        r = report[mode]
        spans = ", ".join(f"{span} {ratio:.3f}" for span, ratio in ratios[mode].items())
        print(
            f"{mode}: greedy text identical in {r['identical']:.0%} of runs; first-step logits cosine "
            f"min {r['cos_min']:.4f}, median {r['cos_median']:.4f}; weights {r['bytes'] / 1e6:.1f} MB "
            f"(x float32: {spans}); {r['ms_per_token']:.1f} ms/token"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
