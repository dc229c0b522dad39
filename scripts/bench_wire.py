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
import struct
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPANS = ("0:10", "10:20", "20:30")
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for learning to program.",
    "What is 17 times 23?",
    "Tell me a short story about a robot who learns to paint.",
    "Why is the sky blue?",
    "List the planets of the solar system.",
    "Translate 'good morning' into Spanish and German.",
    "What are the benefits of regular exercise?",
    "Describe a cat to someone who has never seen one.",
    "How do I make a cup of tea?",
    "What is the difference between weather and climate?",
    "Write a limerick about a programmer.",
    "Summarize the plot of Romeo and Juliet.",
    "What causes earthquakes?",
    "Suggest a name for a coffee shop by the beach.",
    "How does a bicycle stay upright?",
    "What should I pack for a weekend hiking trip?",
    "Explain what a neural network is to a child.",
    "What is the boiling point of water at the top of a mountain, and why?",
    "Write a short poem about autumn leaves.",
    "How do vaccines work?",
    "Give me a recipe for a simple tomato soup.",
    "What is the Pythagorean theorem?",
    "Describe the water cycle.",
    "Why do we have seasons on Earth?",
    "Write a polite email asking a colleague for a meeting.",
    "What are three good habits for better sleep?",
    "Explain the difference between a virus and a bacterium.",
    "How does a rainbow form?",
    "What is the tallest mountain in the world?",
    "Give me five ideas for a birthday party.",
    "Explain how a computer stores numbers.",
    "What is the role of the heart in the human body?",
    "Write a two-sentence horror story.",
    "How can I save money on groceries?",
    "What does a bee do all day?",
    "Explain gravity to a ten-year-old.",
    "What are the main causes of air pollution?",
    "What is the largest ocean on Earth?",
    "Write a short thank-you note to a teacher.",
    "Explain how a refrigerator keeps food cold.",
    "What are the primary colors?",
    "Give me a list of five fruits that are high in vitamin C.",
    "How do airplanes fly?",
    "What is the meaning of the word 'ephemeral'?",
    "Describe a sunset over the desert.",
    "What is the speed of light?",
    "Write a riddle about a clock.",
    "How do plants get water from the soil?",
    "What is the difference between a lake and a pond?",
    "Suggest three books for someone who likes science fiction.",
    "Why do leaves change color in the fall?",
    "Explain what an atom is.",
    "Write a short dialogue between a cat and a dog.",
    "How many continents are there, and what are they?",
    "What is a healthy breakfast?",
    "Explain the rules of tic-tac-toe.",
    "What is the capital of Japan?",
    "Write a motivational quote for students.",
    "How does the moon affect the tides?",
    "What is inflation in economics?",
    "Describe the taste of chocolate.",
    "How do I tie a shoelace?",
    "What is the function of the lungs?",
    "Give me an idea for a science fair project.",
    "Why do cats purr?",
    "Explain what a volcano is.",
    "Write a short poem about the moon.",
    "What are the three states of matter?",
    "How does a compass work?",
    "What is a prime number?",
    "Describe your ideal weekend.",
    "What is the main ingredient in guacamole?",
    "How do fish breathe underwater?",
    "Write a sentence using the word 'serendipity'.",
    "What is the difference between a noun and a verb?",
    "How do solar panels make electricity?",
    "Name three famous painters and one work by each.",
    "What is the purpose of a passport?",
    "Explain why we need sleep.",
    "Write a short story about a lost key.",
    "What are clouds made of?",
    "How can I be more productive at work?",
    "What is the longest river in the world?",
    "Explain the water pressure in the deep ocean.",
    "Give me a fun fact about octopuses.",
    "What is democracy?",
    "How do birds know where to migrate?",
    "Write a tweet announcing a new bakery.",
    "What are the benefits of reading books?",
    "Explain what DNA is in simple terms.",
    "How does a microwave oven heat food?",
    "What is the square root of 144?",
    "Describe a busy city street in the morning.",
    "What should I do if I feel stressed?",
    "Explain the difference between speed and velocity.",
    "Write a short apology message to a friend.",
    "What is the greenhouse effect?",
    "How do bees make honey?",
    "What is a haiku?",
    "Give me three ways to reduce plastic waste.",
    "Why is the ocean salty?",
    "Explain how a battery works.",
    "What is the tallest animal?",
    "Write a product description for a water bottle.",
    "How do you calculate the area of a circle?",
    "What is the history of the Olympic Games in one paragraph?",
    "Explain why ice floats on water.",
    "What are some good questions to ask in a job interview?",
    "How do stars form?",
    "Write a short lullaby.",
    "What is a black hole?",
    "How do I start learning to play the guitar?",
    "What is the difference between an ocean and a sea?",
    "Explain the basics of saving for retirement.",
    "What do pandas eat?",
    "Write an opening line for a mystery novel.",
    "How does the internet work?",
]
LONG_PROMPT = (
    "Read the following notes and summarize them in three bullet points. "
    "The town council met on Tuesday evening to discuss the new library, the repair of the old "
    "bridge over the river, and the summer festival. The library will open next spring in the "
    "former post office building; it will have a reading room for children, a small cafe and "
    "twenty computers for public use. The bridge has been closed to trucks since March because "
    "engineers found cracks in two of its supports; repairs will start in August and take about "
    "four months, during which traffic will use the northern road. The festival will run for three "
    "days in July with music on the main square, a market of local farmers and craftspeople, and "
    "fireworks on the last night. Volunteers are needed for the festival, especially to help with "
    "parking, first aid and cleaning the square each morning. The council also thanked the school "
    "for planting forty trees along the river path and asked residents to water them during dry "
    "weeks of the summer."
)


class Counting(httpx.AsyncBaseTransport):
    """An in-memory network of peers' apps that notes every steps message that crosses it:
    (body bytes, tensor bytes, positions, whether it is a prefill)."""

    def __init__(self):
        self.apps: dict[str, httpx.ASGITransport] = {}
        self.messages: list[tuple[int, int, int, bool]] = []

    async def handle_async_request(self, request):
        from peers.transport.frames import PATH_STEPS, decode_steps

        if request.url.path == PATH_STEPS:
            body = await request.aread()
            reqs = decode_steps(body)
            assert all(r.tensor.dim() == 3 for r in reqs), "only hidden states cross the wire here"
            positions = sum(r.tensor.shape[0] * r.tensor.shape[1] for r in reqs)
            prefill = any(r.tensor.shape[1] > 1 for r in reqs)
            self.messages.append((len(body), _tensor_bytes(body), positions, prefill))
        return await self.apps[f"{request.url.host}:{request.url.port}"].handle_async_request(request)


def _tensor_bytes(body: bytes) -> int:
    """The bytes of a steps message's frames that are tensor data (scales included), not headers."""
    (count,), offset, total = struct.unpack_from(">I", body), 4, 0
    for _ in range(count):
        (frame,) = struct.unpack_from(">I", body, offset)
        (header,) = struct.unpack_from(">I", body, offset + 4)
        total += frame - 4 - header
        offset += 4 + frame
    return total


async def start(model: str, wire: str):
    import torch

    from peers.config import NodeConfig
    from peers.node import PeerNode
    from peers.server import create_app
    from peers.swarm.membership import GossipSettings

    gossip = GossipSettings(interval_s=0.5, suspect_after_s=20, dead_after_s=40, tombstone_s=120)
    net = Counting()
    nodes = []
    for i, layers in enumerate(SPANS):
        config = NodeConfig(
            model=model,
            layers=layers,
            port=9100 + i,
            join=("127.0.0.1:9100",) if i else (),
            threads=torch.get_num_threads(),
            gossip=gossip,
            wire=wire,
            prefix_reuse=False,
            speculative=False,
        )
        node = PeerNode(config, http=httpx.AsyncClient(transport=net))
        net.apps[config.address] = httpx.ASGITransport(app=create_app(node))
        nodes.append(node)
    await asyncio.gather(*(n.start() for n in nodes))
    for _ in range(400):  # until every table knows (and has vouched for) every peer
        if all(len(n.table.serving(n.model_id)) == len(nodes) for n in nodes):
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError("the three peers did not find each other")
    return net, nodes


async def run_mode(model: str, wire: str, prompts: list[list[int]], long_prompt: list[int], tokens: int):
    from peers.entry.generation import generate
    from peers.transport.frames import Sampling

    net, nodes = await start(model, wire)
    entry = nodes[0]
    try:

        async def greedy(ids: list[int], n: int) -> list[int]:
            out = []
            async for step in generate(entry, ids, n, Sampling(temperature=0), frozenset()):
                out.append(step[0].token)
            return out

        await greedy(prompts[0], 2)  # warm up
        net.messages.clear()
        await greedy(long_prompt, 1)
        prefill = [m for m in net.messages if m[3]]
        net.messages.clear()
        started, runs = time.perf_counter(), []
        for ids in prompts:
            runs.append(await greedy(ids, tokens))
        seconds = time.perf_counter() - started
        decode = [m for m in net.messages if not m[3]]
    finally:
        await asyncio.gather(*(n.close() for n in nodes))
    positions = lambda ms: sum(m[2] for m in ms)  # noqa: E731
    return {
        "prefill": sum(m[0] for m in prefill) / positions(prefill),
        "prefill_tensor": sum(m[1] for m in prefill) / positions(prefill),
        "decode": sum(m[0] for m in decode) / positions(decode),
        "decode_tensor": sum(m[1] for m in decode) / positions(decode),
        "hops": (len(prefill), len(decode)),
        "runs": runs,
        "tokens_per_s": len(prompts) * tokens / seconds,
        "hidden": entry.model_config.hidden_size,
    }


def forced(model: str, modes: list[str], prompts: list[list[int]], tokens: int) -> dict:
    """Teacher-forced agreement of each mode with the lossless wire (see the module's doc):
    {mode: (runs that agree, mean |change of the top-2 gap|)}."""
    import torch
    from transformers import AutoModelForCausalLM

    from peers.transport.wire import decode_hidden, encode_hidden

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
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


def main() -> int:
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
        results = {}
        for mode in args.modes:
            results[mode] = asyncio.run(run_mode(str(source.path), mode, prompts, long_prompt, args.tokens))
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
    if args.forced_prompts:
        many = [chat(p) for p in PROMPTS[: args.forced_prompts]]
        print(
            f"\nTeacher-forced agreement with the lossless wire, {len(many)} prompts x {args.tokens} "
            "tokens (runs in which no position's likeliest token moves; mean change of the gap "
            "between the two likeliest tokens' logits, over every position):\n"
        )
        print("| wire | runs that agree | mean gap change |")
        print("|---|---|---|")
        for mode, (agree, moved) in forced(str(source.path), args.modes, many, args.tokens).items():
            print(f"| {mode} | {agree}/{len(many)} ({100 * agree / len(many):.1f}%) | {moved:.4f} |")
    from inference.block import load_config

    hidden, prefill = load_config(source.path).hidden_size, len(long_prompt)
    print(
        f"\nCodec time per frame on one thread (encode / decode, microseconds), float32 hidden states of size {hidden}:\n"
    )
    print(f"| wire | prefill frame ({prefill} positions) | decode frame (1 position) |")
    print("|---|---|---|")
    for mode in args.modes:
        (pe, pd), (de, dd) = codec_us(mode, prefill, hidden), codec_us(mode, 1, hidden)
        print(f"| {mode} | {pe:.0f} / {pd:.0f} | {de:.0f} / {dd:.0f} |")
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
