"""Benchmark: a block's compute for each family against transformers' own model of that family, in
one process on this machine. Per family, a random model of a small real-looking shape (hidden
512, 4 layers; mixtures of experts: 8 experts, top 2) saved as safetensors, then `--runs` runs of:

- the block: `load_block` of all its layers; `--streams` sessions prefill `--prompt` tokens each,
  then decode `--tokens` steps, every session's step in one batched forward (as a peer's
  scheduler runs them);
- transformers: the family's ...ForCausalLM with its own cache, the same sessions as one batch
  (prompts of one length by default: no padding; with `--mixed`, lengths from a quarter to 1.75x
  `--prompt`, left-padded with their attention mask and positions), the same prefill and decode
  steps;

their decode steps interleaved one by one (which goes first alternates), so that both meet the
machine in the same state: on a shared host another job's load comes and goes within seconds,
and runs of one after the other differed by +-10%.

Reported: decode tokens per second of each (streams x tokens over the median decode time) and
the median over the runs of each run's ratio (block / transformers; >= 1 means the block is not
slower). Both produce float32 logits of every sequence at every step; the first steps' logits are
compared (max difference).

    python scripts/bench_families.py [--families qwen3 mixtral ...] [--streams 8] [--tokens 32]
                                     [--prompt 64] [--runs 5] [--threads 1] [--mixed]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

from inference.batch import Step  # noqa: E402
from inference.block import load_block  # noqa: E402
from tests.helpers import FAMILIES, save_tiny_model  # noqa: E402

SHAPE = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=4096,
    max_position_embeddings=4096,
)
MOE_SHAPE = dict(moe_intermediate_size=352, num_experts=8, num_local_experts=8, n_routed_experts=8)
LATENT = dict(
    num_key_value_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32
)


def shape_of(kind: str, hidden: int = 512) -> dict:
    """The family's bench shape; `hidden` scales widths and heads (64 dims a head) from 512."""
    shape = dict(SHAPE)
    if hidden != 512:
        shape.update(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_attention_heads=hidden // 64)
        shape["num_key_value_heads"] = hidden // 128
    if kind in ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "glm4_moe"):
        shape.update(MOE_SHAPE)
    if kind == "gpt_oss":
        shape["intermediate_size"] = 352  # (its experts' width)
    if kind == "deepseek_v3":
        shape.update(LATENT, v_head_dim=64, head_dim=32)  # (its head_dim is the rotary part of a head)
        shape["num_key_value_heads"] = shape["num_attention_heads"]  # (latent attention: one KV per head)
    if kind == "gemma3_text":
        shape["query_pre_attn_scalar"] = 64
    return shape


def per_layer(kind: str, layers: int) -> dict:
    """The families' per-layer lists, as long as the layers asked for."""
    if kind in ("gemma3_text", "gpt_oss"):
        return {"layer_types": (["sliding_attention", "full_attention"] * layers)[:layers]}
    if kind == "smollm3":
        return {"no_rope_layers": [1] * (layers - 1) + [0]}
    return {}


class BlockRun:
    """The sessions as a peer's scheduler batches them: each prompt's own length, no padding."""

    def __init__(self, block, prompts: list[torch.Tensor]):
        self.block, self.lengths = block, [len(p) for p in prompts]
        self.ids = [f"s{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        outs = block.forward_batch([Step(sid, p[None], 0) for sid, p in zip(self.ids, prompts, strict=True)])
        errors = [o for o in outs if isinstance(o, Exception)]
        if errors:
            raise errors[0]
        self.first = torch.cat(outs)[:, -1]
        self.next, self.done = self.first.argmax(-1), 0

    def step(self) -> None:
        steps = [
            Step(sid, self.next[i].view(1, 1), self.lengths[i] + self.done) for i, sid in enumerate(self.ids)
        ]
        self.next = torch.cat(self.block.forward_batch(steps))[:, -1].argmax(-1)
        self.done += 1

    def close(self) -> None:
        for sid in self.ids:
            self.block.close(sid)


class ReferenceRun:
    """One batch: prompts of different lengths left-padded, with their mask and positions."""

    @torch.inference_mode()
    def __init__(self, model, prompts: list[torch.Tensor]):
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        self.mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p) :], self.mask[i, longest - len(p) :] = p, 1
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.model, self.cache = model, DynamicCache(config=model.config)
        out = model(
            ids, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache, use_cache=True
        )
        self.first = out.logits[:, -1].float()
        self.next, self.position = self.first.argmax(-1), positions[:, -1:]

    @torch.inference_mode()
    def step(self) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], 1)
        self.position = self.position + 1
        out = self.model(
            self.next[:, None],
            attention_mask=self.mask,
            position_ids=self.position,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.next = out.logits[:, -1].argmax(-1)


def paired_run(block, model, prompts: list[torch.Tensor], tokens: int) -> tuple[float, float, float]:
    """Both decode the same sessions step by step, alternating which goes first, so that both see
    the machine as it is at that moment (another job's load comes and goes in seconds here):
    (the block's decode seconds, transformers', the largest difference of their first logits)."""
    ours, theirs = BlockRun(block, prompts), ReferenceRun(model, prompts)
    diff = (ours.first - theirs.first).abs().max().item()
    timed = [0.0, 0.0]
    for t in range(tokens):
        for i in (0, 1) if t % 2 == 0 else (1, 0):
            started = time.perf_counter()
            (ours, theirs)[i].step()
            timed[i] += time.perf_counter() - started
    ours.close()
    return timed[0], timed[1], diff


def bench(kind: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        shape = {
            **shape_of(kind, args.hidden),
            **per_layer(kind, args.layers),
            "num_hidden_layers": args.layers,
        }
        path = save_tiny_model(kind, Path(tmp) / kind, **shape)
        block = load_block(path, prefix_cache_tokens=0)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation="sdpa"
            )
        except ValueError:  # (GPT-OSS runs only eagerly in transformers)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager"
            )
        model.eval()
    torch.manual_seed(1)
    if args.mixed:  # lengths spread from a quarter of --prompt to 1.75 of it, as real traffic
        lengths = [
            max(1, args.prompt * (1 + 6 * i // max(1, args.streams - 1)) // 4) for i in range(args.streams)
        ]
    else:
        lengths = [args.prompt] * args.streams
    prompts = [torch.randint(3, 4000, (n,)) for n in lengths]
    ours, theirs, ratios, diff = [], [], [], 0.0
    for _ in range(args.runs):
        t_block, t_ref, d = paired_run(block, model, prompts, args.tokens)
        ours.append(t_block)
        theirs.append(t_ref)
        ratios.append(t_ref / t_block)
        diff = max(diff, d)
    n = args.streams * args.tokens
    block_tps, ref_tps = n / statistics.median(ours), n / statistics.median(theirs)
    return {
        "family": kind,
        "block": block_tps,
        "transformers": ref_tps,
        "ratio": statistics.median(ratios),
        "diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (a multiple of 128)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--mixed", action="store_true", help="prompts of different lengths (padded by transformers)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{args.streams} streams, {'mixed lengths around ' if args.mixed else ''}{args.prompt}-token prompts, "
        f"{args.tokens} decode steps, {args.threads} thread(s)"
    )
    print("| family | block tok/s | transformers tok/s | ratio | max logit diff |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for kind in args.families:
        row = bench(kind, args)
        rows.append(row)
        print(
            f"| {row['family']} | {row['block']:.1f} | {row['transformers']:.1f} | {row['ratio']:.2f} | {row['diff']:.1e} |",
            flush=True,
        )
    print(f"median ratio {statistics.median(r['ratio'] for r in rows):.2f}")


if __name__ == "__main__":
    main()
