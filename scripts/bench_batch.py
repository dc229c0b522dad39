"""Benchmark: the KV layout of a batched forward. One block of the default model runs decode steps
of N sessions (each with `--context` cached positions) as one forward, with the layout LayerSwarm
uses (per-session buffers, attention per sequence on its own cache: no copies, no padding) and
with the alternative of gathering every session's cache into one padded tensor with a mask (one
attention call per layer). Same process, alternating, medians.

    python scripts/bench_batch.py [--layers 0:10] [--context 256] [--sessions 1,8,32,64] [--runs 5]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference import load_block, resolve_model  # noqa: E402
from inference.batch import ATTENTION, Step  # noqa: E402


def padded_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Decode steps only: gather every sequence's cache into [N, kv_heads, L_max, d] + mask."""
    batch = kwargs["batch"]
    segs = batch.segments
    lengths = [s.past + s.steps for s in segs]
    longest = max(lengths)
    k0, _ = segs[0].cache.read(module.layer_idx, segs[0].row, lengths[0])
    keys = k0.new_zeros(len(segs), k0.shape[1], longest, k0.shape[3])
    values = torch.zeros_like(keys)
    mask = torch.zeros(len(segs), 1, 1, longest, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(segs, lengths, strict=True)):
        k, v = s.cache.read(module.layer_idx, s.row, n)
        keys[i, :, :n], values[i, :, :n] = k[0], v[0]
        mask[i, ..., :n] = True
    q = query[0].transpose(0, 1)[:, :, None]  # [N, heads, 1, d]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out[:, :, 0][None], None  # [1, N, heads, d]


AttentionInterface.register("bench_padded", padded_attention)


def timed_decode(block, n: int, context: int, layout: str, tag: str) -> float:
    """Seconds for one decode forward of n sessions after a prefill of `context` positions each."""
    block.config._attn_implementation = ATTENTION
    hidden = block.config.hidden_size
    first = block.span.start == 0
    ids = [f"{tag}-{i}" for i in range(n)]
    prompt = (
        torch.randint(0, 1000, (1, context)) if first else torch.randn(1, context, hidden)
    )  # [1, T] or [1, T, H]
    for sid in ids:
        block.forward_batch([Step(sid, prompt, 0)])
    step = torch.randint(0, 1000, (1, 1)) if first else torch.randn(1, 1, hidden)
    block.config._attn_implementation = ATTENTION if layout == "varlen" else "bench_padded"
    t0 = time.perf_counter()
    outs = block.forward_batch([Step(sid, step, context) for sid in ids])
    elapsed = time.perf_counter() - t0
    assert not any(isinstance(o, Exception) for o in outs), [o for o in outs if isinstance(o, Exception)][:1]
    for sid in ids:
        block.close(sid)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="0:10")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--sessions", default="1,8,32,64")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    block = load_block(
        resolve_model(args.model).path, args.layers, max_cache_tokens=1 << 22, idle_timeout_s=3600
    )
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores; layers {args.layers} of {args.model}; context {args.context}")
    print("| sessions | varlen ms/forward | padded ms/forward | varlen ms/token | padded / varlen |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in (int(x) for x in args.sessions.split(",")):
        times = {"varlen": [], "padded": []}
        for run in range(args.runs):
            for layout in ("varlen", "padded") if run % 2 == 0 else ("padded", "varlen"):
                times[layout].append(timed_decode(block, n, args.context, layout, f"{layout}{run}-{n}"))
        v, p = statistics.median(times["varlen"]), statistics.median(times["padded"])
        print(f"| {n} | {1000 * v:.1f} | {1000 * p:.1f} | {1000 * v / n:.2f} | {p / v:.2f} |")


if __name__ == "__main__":
    main()
