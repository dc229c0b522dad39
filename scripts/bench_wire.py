"""Benchmark: what hidden states cost on the wire with each `--wire` mode, and what it does to
greedy text. Three peers of the default model (layers 0:10, 10:20, 20:30) in one process over
httpx's in-memory transport: the same HTTP apps, frames and forwarding as on a network, with
the steps messages' bodies counted as they pass. The entry is the first peer, so both hops
carry hidden states; no drafting and no prefix reuse, so that a decode frame is one position
and a prefill frame the whole prompt.

- bytes per token per hop: a steps message's body (its frame headers included) over its
  positions, for a ~200-token chat prompt's prefill and for every decode step of the runs;
- greedy agreement with the lossless wire: the share of prompts x tokens runs whose tokens are
  all identical (and the mean length of the common prefix);
- the same agreement teacher-forced, over more prompts (`--forced-prompts`, 120 by default):
  each prompt and its lossless greedy continuation go through the monolithic model once, their
  hidden states at the peers' boundaries (after layers 10 and 20) passed through the wire's
  codec as the frames would carry them (the prompt as one prefill frame from position 0, each
  later position as a decode frame); a run agrees when no position's likeliest token moves,
  as a generated run would up to the first position that moves. It also reports how far each
  encoding moves the gap between the two likeliest tokens (mean over every position): a
  measure with far less noise than counting runs.

    python scripts/bench_wire.py [--prompts 40] [--forced-prompts 120] [--tokens 64]
                                 [--modes lossless bf16 fp16 int8]
"""

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from scripts.wire_prompts import LONG_PROMPT, PROMPTS  # noqa: E402
from scripts.wire_swarm import SPANS, run_mode  # noqa: E402


def forced(model: str, modes: list[str], prompts: list[list[int]], tokens: int) -> dict:
    """Teacher-forced agreement of each mode with the lossless wire (see the module's doc):
    {mode: (runs that agree, mean |change of the top-2 gap|)}."""
    import torch

    from inference.whole_model import load_whole_model
    from peers.transport.wire import decode_hidden, encode_hidden

    lm = load_whole_model(model, torch.float32)
    state = {"mode": "lossless", "prompt": 0}

    def wire(tensor: torch.Tensor, start: int) -> torch.Tensor:
        fields, payload = encode_hidden(tensor, state["mode"], 1, start)
        return decode_hidden(fields, tensor.dtype, list(tensor.shape), payload)

    def boundary(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if state["mode"] == "lossless":
            return output
        n = state["prompt"]
        prefill = wire(hidden[:, :n].contiguous(), 0)
        decode = wire(hidden[0, n:, None].contiguous(), n).transpose(0, 1)  # one frame a position
        out = torch.cat((prefill, decode), 1)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    for span in SPANS[:-1]:
        lm.model.layers[int(span.split(":")[1]) - 1].register_forward_hook(boundary)
    sequences = []
    with torch.no_grad():
        for ids in prompts:
            out = lm.generate(
                torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
            sequences.append(out[0, : len(ids) + tokens - 1])

    def logits(seq: torch.Tensor, n: int) -> torch.Tensor:
        state["prompt"] = n
        with torch.no_grad():
            return lm(seq[None]).logits[0, n - 1 :]  # the `tokens` positions that choose a token

    reference = [logits(seq, len(ids)) for seq, ids in zip(sequences, prompts, strict=True)]
    results = {}
    for mode in modes:
        state["mode"], agree, moved = mode, 0, []
        for seq, ids, ref in zip(sequences, prompts, reference, strict=True):
            got = logits(seq, len(ids))
            top = ref.topk(2, -1).indices
            agree += bool((got.argmax(-1) == top[:, 0]).all())
            moved.append((_gap(got, top) - _gap(ref, top)).abs().flatten())
        results[mode] = (agree, float(torch.cat(moved).mean()))
    return results


def _gap(logits, top):
    """Per position, the logit of `top`'s first token less that of its second."""
    return logits.gather(-1, top[:, :1]) - logits.gather(-1, top[:, 1:])


def codec_us(mode: str, positions: int, hidden: int) -> tuple[float, float]:
    """Microseconds to encode and to decode one step frame of `positions` float32 hidden states,
    on one thread (as the cores are shared, more threads mostly measure their contention)."""
    import torch

    from peers.transport.frames import Hop, Sampling, StepRequest, decode_step, encode_step

    x = torch.randn(1, positions, hidden)
    req = StepRequest("s" * 32, 0, [Hop("a" * 43, "127.0.0.1:9101", 10, 30)], Sampling(), x, wire=mode)
    reps, threads = max(5, 2000 // positions), torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for _ in range(reps):
        frame = encode_step(req)
    t1 = time.perf_counter()
    for _ in range(reps):
        decode_step(frame)
    t2 = time.perf_counter()
    torch.set_num_threads(threads)
    return (t1 - t0) / reps * 1e6, (t2 - t1) / reps * 1e6


def options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--prompts", type=int, default=40, help="chat prompts of the agreement runs (0: skip them)"
    )
    parser.add_argument(
        "--forced-prompts",
        type=int,
        default=len(PROMPTS),
        help=f"chat prompts of the teacher-forced agreement (at most {len(PROMPTS)}; 0: skip it)",
    )
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per run")
    parser.add_argument("--modes", nargs="+", default=["lossless", "bf16", "fp16", "int8"])
    return parser


def report_runs(
    args: argparse.Namespace, model: str, prompts: list[list[int]], long_prompt: list[int]
) -> None:
    """Bytes per token per hop and greedy agreement with the lossless wire, mode by mode."""
    results = {}
    for mode in args.modes:
        results[mode] = asyncio.run(run_mode(model, mode, prompts, long_prompt, args.tokens))
        r = results[mode]
        print(
            f"  {mode}: {r['prefill']:.0f} B/token prefill, {r['decode']:.0f} B/token decode "
            f"({r['hops'][0]} prefill and {r['hops'][1]} decode messages; {r['tokens_per_s']:.1f} tokens/s "
            "on these cores, three peers in one process)",
            flush=True,
        )

    base = results["lossless"]
    print(
        "\nBytes per token per hop: whole steps messages (frame headers included), and in brackets "
        "their tensor data alone (int8: scales included)\n"
    )
    print(
        "| wire | prefill B/token/hop | vs lossless | decode B/token/hop | vs lossless "
        "| identical greedy runs | mean common prefix |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        same = [a == b for a, b in zip(r["runs"], base["runs"], strict=True)]
        prefix = [_common(a, b) for a, b in zip(r["runs"], base["runs"], strict=True)]
        print(
            f"| {mode} | {r['prefill']:.0f} ({r['prefill_tensor']:.0f}) "
            f"| {r['prefill'] / base['prefill']:.3f} ({r['prefill_tensor'] / base['prefill_tensor']:.3f}) "
            f"| {r['decode']:.0f} ({r['decode_tensor']:.0f}) "
            f"| {r['decode'] / base['decode']:.3f} ({r['decode_tensor'] / base['decode_tensor']:.3f}) "
            f"| {sum(same)}/{len(same)} ({100 * sum(same) / len(same):.0f}%) "
            f"| {statistics.mean(prefix):.1f} of {args.tokens} |"
        )


def report_forced(args: argparse.Namespace, model: str, many: list[list[int]]) -> None:
    """The teacher-forced agreement of each mode with the lossless wire."""
    print(
        f"\nTeacher-forced agreement with the lossless wire, {len(many)} prompts x {args.tokens} "
        "tokens (runs in which no position's likeliest token moves; mean change of the gap "
        "between the two likeliest tokens' logits, over every position):\n"
    )
    print("| wire | runs that agree | mean gap change |")
    print("|---|---|---|")
    for mode, (agree, moved) in forced(model, args.modes, many, args.tokens).items():
        print(f"| {mode} | {agree}/{len(many)} ({100 * agree / len(many):.1f}%) | {moved:.4f} |")


def report_codec(modes: list[str], prefill: int, hidden: int) -> None:
    """Each mode's encode and decode time of a prefill frame and of a decode frame."""
    print(
        f"\nCodec time per frame on one thread (encode / decode, microseconds), float32 hidden states of size {hidden}:\n"
    )
    print(f"| wire | prefill frame ({prefill} positions) | decode frame (1 position) |")
    print("|---|---|---|")
    for mode in modes:
        (pe, pd), (de, dd) = codec_us(mode, prefill, hidden), codec_us(mode, 1, hidden)
        print(f"| {mode} | {pe:.0f} / {pd:.0f} | {de:.0f} / {dd:.0f} |")


def main() -> int:
    parser = options()
    args = parser.parse_args()
    if args.modes[0] != "lossless":
        parser.error("--modes starts with lossless, the reference")

    from inference import Tokenizer, resolve_model
    from scripts.machine import cpu_model

    source = resolve_model(args.model)
    tok = Tokenizer(source.path)
    chat = lambda text: tok.encode_chat([{"role": "user", "content": text}])  # noqa: E731
    prompts = [chat(p) for p in PROMPTS[: args.prompts]]
    long_prompt = chat(LONG_PROMPT)
    print(f"{source.model_id}, layers {', '.join(SPANS)} in one process; {cpu_model()}")
    print(f"prefill prompt {len(long_prompt)} tokens; {len(prompts)} prompts x {args.tokens} greedy tokens\n")
    if args.prompts:
        report_runs(args, str(source.path), prompts, long_prompt)
    if args.forced_prompts:
        report_forced(args, str(source.path), [chat(p) for p in PROMPTS[: args.forced_prompts]])
    from inference.block import load_config

    report_codec(args.modes, len(long_prompt), load_config(source.path).hidden_size)
    return 0


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


if __name__ == "__main__":
    sys.exit(main())
