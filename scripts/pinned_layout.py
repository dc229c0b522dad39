"""The benchmarks' pinned layout (--pinned): two peers of the model, layers 0:15 and 15:30, each on
a core of its own with one thread (`peer serve --cpus`), against the monolithic model with one
thread on one of those cores, measured in the same run while the swarm is idle."""

import argparse
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scripts.swarm_load import start_problem
from tests.peers.processes import Swarm

PINNED_SPLIT = ("0:15", "15:30")


def pinned_cores() -> tuple[int, ...]:
    """One core per peer of PINNED_SPLIT, from those this process may use."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < len(PINNED_SPLIT):
        raise ValueError(
            f"--pinned needs {len(PINNED_SPLIT)} cores, one per peer; this process may use {len(usable)}"
        )
    return tuple(usable[: len(PINNED_SPLIT)])


def describe() -> str:
    cores = pinned_cores()
    peers = ", ".join(f"{layers} on core {core}" for layers, core in zip(PINNED_SPLIT, cores, strict=True))
    return f"pinned: peers {peers}, one thread each; monolithic on core {cores[0]}, one thread, swarm idle"


def start_pinned_swarm(
    model: str, args: list[str] = (), prefix: str = "bench-pinned-", delay_ms: float | None = None
) -> tuple[Swarm, str | None]:
    """The pinned 2-peer swarm (with `delay_ms`, each behind a delay proxy) with a complete route
    from every peer: (swarm, None) when it serves, or (swarm, why) when a peer failed to start
    (the swarm must still be stopped)."""
    swarm = Swarm(model, Path(tempfile.mkdtemp(prefix=prefix)), args=list(args), threads=None)
    for layers, core in zip(PINNED_SPLIT, pinned_cores(), strict=True):
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
        help="two peers (0:15, 15:30) each on a core of its own with one thread, against the monolithic "
        "model on one core with one thread",
    )


def check_pinned(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--pinned needs a core for each peer (parser.error where this process has fewer)."""
    if args.pinned:
        try:
            pinned_cores()
        except ValueError as e:
            parser.error(str(e))
