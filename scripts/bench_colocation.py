"""Benchmark: what three processes sharing this machine's cores cost a chain, with no network
at all. The default model's decode step, greedy, in the same run, alternating, medians:

- monolithic transformers (one process);
- the three blocks 0:10, 10:20, 20:30 one after the other in one process;
- the same three blocks in three processes handing the hidden states on through pipes (what a
  3-peer swarm on one machine pays before any HTTP), with OpenMP's idle threads spinning
  (active) or sleeping (passive).

    python scripts/bench_colocation.py [--runs 3] [--tokens 48]
"""

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPANS = ("0:10", "10:20", "20:30")
PROMPT = [1] * 40
WARMUP = 8


def monolithic(path: str, tokens: int) -> float:
    import torch

    from inference.whole_model import load_whole_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_whole_model(path, torch.float32)
    times = []
    with torch.inference_mode():
        out = model(torch.tensor([PROMPT]), use_cache=True)
        for _ in range(tokens + WARMUP):
            t0 = time.perf_counter()
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[WARMUP:])


def one_process(path: str, tokens: int) -> float:
    import torch

    from inference import load_block

    torch.set_num_threads(os.cpu_count() or 1)
    blocks = [load_block(path, span) for span in SPANS]
    x = torch.tensor([PROMPT])
    for b in blocks:
        x = b.forward("s", x, 0)
    times = []
    for i in range(tokens + WARMUP):
        t0 = time.perf_counter()
        h = x[:, -1:].argmax(-1)
        for b in blocks:
            h = b.forward("s", h, len(PROMPT) + i)
        x = h
        times.append(time.perf_counter() - t0)
    return statistics.median(times[WARMUP:])


def _stage(path: str, span: str, inbox, outbox, policy: str) -> None:
    os.environ["OMP_WAIT_POLICY"] = policy  # read when torch loads
    import torch

    from inference import load_block

    torch.set_num_threads(os.cpu_count() or 1)
    block = load_block(path, span)
    while (msg := inbox.recv()) is not None:
        position, h = msg
        out = block.forward("s", h, position)
        outbox.send((position, out[:, -1:].argmax(-1) if span == SPANS[-1] else out))
    outbox.send(None)


def three_processes(path: str, tokens: int, policy: str) -> float:
    import torch

    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(len(SPANS) + 1)]
    procs = [
        ctx.Process(target=_stage, args=(path, span, pipes[i][1], pipes[i + 1][0], policy))
        for i, span in enumerate(SPANS)
    ]
    for p in procs:
        p.start()
    send, recv = pipes[0][0], pipes[-1][1]
    try:
        send.send((0, torch.tensor([PROMPT])))
        _, token = recv.recv()
        times = []
        for i in range(tokens + WARMUP):
            t0 = time.perf_counter()
            send.send((len(PROMPT) + i, token))
            _, token = recv.recv()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[WARMUP:])
    finally:
        send.send(None)
        for p in procs:
            p.join(30)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()

    from inference import resolve_model
    from scripts.machine import cpu_model

    path = str(resolve_model("smollm2-135m").path)
    cases = {
        "monolithic": lambda: monolithic(path, args.tokens),
        "3 blocks, 1 process": lambda: one_process(path, args.tokens),
        "3 processes, OpenMP active": lambda: three_processes(path, args.tokens, "ACTIVE"),
        "3 processes, OpenMP passive": lambda: three_processes(path, args.tokens, "PASSIVE"),
    }
    samples = {name: [] for name in cases}
    for _ in range(args.runs):  # alternate, so that machine noise hits all alike
        for name, run in cases.items():
            samples[name].append(run())
    base = statistics.median(samples["monolithic"])
    print(f"\nsmollm2-135m decode step, median of {args.runs} runs; {cpu_model()}")
    for name, values in samples.items():
        ms = statistics.median(values) * 1000
        print(f"  {name:<28} {ms:6.1f} ms/token  {ms / (base * 1000):5.2f}x monolithic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
