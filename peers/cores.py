"""A peer's own CPU cores (--cpus): the list read and checked against the cores this process may
use, the whole process pinned to them before torch starts its threads, and how the co-located
peers of a local swarm split a machine's cores. Torch-free (the parser reads it)."""

import os
from collections.abc import Iterable, Sequence


def usable_cpus() -> tuple[int, ...]:
    """The cores this process may run on (its affinity), in order."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return tuple(range(os.cpu_count() or 1))


def parse_cpus(text: str | None) -> tuple[int, ...]:
    """`0`, `0,1`, `2-3` or `0,2-3` as sorted core numbers; () for none given."""
    if text is None:
        return ()
    cpus: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"--cpus takes core numbers and ranges such as 0,2-3, got {text!r}")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"--cpus: the range {part.strip()} runs backwards (in {text!r})")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpus(cpus: Iterable[int]) -> str:
    """Core numbers as --cpus takes them, runs as ranges: (0, 1, 2, 5) -> '0-2,5'."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_cpus(name: str, cpus: tuple[int, ...]) -> None:
    """Every core named must be one this process may run on."""
    usable = usable_cpus()
    missing = [cpu for cpu in cpus if cpu not in usable]
    if missing:
        raise ValueError(
            f"{name} {format_cpus(cpus)} names cores {format_cpus(missing)} that this machine does not have "
            f"or this process may not use (it may use {format_cpus(usable)})"
        )


def pin_cpus(cpus: Sequence[int]) -> None:
    """Run the whole process (every thread it has, and so every thread started later) on `cpus`;
    none given: leave it where it is."""
    if not cpus:
        return
    check_cpus("--cpus", tuple(cpus))
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def split_cpus(peers: int, cpus: Sequence[int]) -> list[tuple[int, ...]] | None:
    """Disjoint cores for `peers` co-located peers: an even split of `cpus` (the first peers get
    one more where it does not divide), or None when there are fewer cores than peers (they
    then share the cores and take turns on them)."""
    assert peers >= 1, peers
    if len(cpus) < peers:
        return None
    share, extra = divmod(len(cpus), peers)
    out, at = [], 0
    for i in range(peers):
        n = share + (i < extra)
        out.append(tuple(cpus[at : at + n]))
        at += n
    return out
