"""The benchmarks' pinned layout (--pinned): two peers of the model, each on a core of its own with
one thread (`peer serve --cpus`), against the monolithic model with one thread on one of those
cores, measured in the same run while the swarm is idle. The two peers' layers: PINNED_SPLIT, or
`--pinned-split A:B,B:C`."""

import argparse
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scripts.swarm_load import start_problem
from tests.peers.processes import Swarm

PINNED_PEERS = 2
# The default split. Measured (bench_concurrency.py --pinned, 8 / 16 streams, ratio to the
# monolithic model on one core): 0:13 0.88 / 1.07, 0:15 0.94-0.98 / 1.16-1.21, 0:17 0.99 / 1.26,
# 0:19 0.64-0.69 / 0.92-0.96. 0:19 balances the blocks' weights (the lm_head is as large as 8
# layers), but the first peer is also the entry (the API, tokens, drafting, streaming).
PINNED_SPLIT = ("0:15", "15:30")


def pinned_cores() -> tuple[int, ...]:
    """One core per pinned peer, from those this process may use."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < PINNED_PEERS:
        raise ValueError(
            f"--pinned needs {PINNED_PEERS} cores, one per peer; this process may use {len(usable)}"
        )
    return tuple(usable[:PINNED_PEERS])


def describe(split: tuple[str, ...]) -> str:
    cores = pinned_cores()
    peers = ", ".join(f"{layers} on core {core}" for layers, core in zip(split, cores, strict=True))
    return f"pinned: peers {peers}, one thread each; monolithic on core {cores[0]}, one thread, swarm idle"


def start_pinned_swarm(
    model: str,
    split: tuple[str, ...],
    args: list[str] = (),
    prefix: str = "bench-pinned-",
    delay_ms: float | None = None,
) -> tuple[Swarm, str | None]:
    """The pinned 2-peer swarm of `split` (with `delay_ms`, each behind a delay proxy) with a
    complete route from every peer: (swarm, None) when it serves, or (swarm, why) when a peer
    failed to start (the swarm must still be stopped)."""
    swarm = Swarm(model, Path(tempfile.mkdtemp(prefix=prefix)), args=list(args), threads=None)
    for layers, core in zip(split, pinned_cores(), strict=True):
        swarm.add(layers, args=["--cpus", str(core)], delay_ms=delay_ms)  # one thread: its one core
    return swarm, start_problem(swarm)


@contextmanager
def on_one_core(core: int | None) -> Iterator[None]:
    """The calling thread (where torch computes with one thread) on `core` meanwhile, then where
    it was; None: leave it where it is."""
    if core is None:
        yield
        return
    before = os.sched_getaffinity(0)  # (pid 0: the calling thread)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def add_pinned_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pinned",
        action="store_true",
        help="two peers each on a core of its own with one thread, against the monolithic model on one "
        "core with one thread",
    )
    parser.add_argument(
        "--pinned-split",
        default=None,
        metavar="A:B,B:C",
        help=f"the pinned peers' layers (default: {','.join(PINNED_SPLIT)})",
    )


def check_pinned(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--pinned needs a core for each peer (parser.error where this process has fewer); sets
    args.pinned_split to the pinned peers' spans."""
    if args.pinned_split is not None and not args.pinned:
        parser.error("--pinned-split is the layout of --pinned: give --pinned too")
    if not args.pinned:
        return
    try:
        pinned_cores()
    except ValueError as e:
        parser.error(str(e))
    if args.pinned_split is None:
        args.pinned_split = PINNED_SPLIT
    else:
        args.pinned_split = tuple(s.strip() for s in args.pinned_split.split(","))
        if len(args.pinned_split) != PINNED_PEERS:
            parser.error(f"--pinned-split names {PINNED_PEERS} spans, one per pinned peer")
