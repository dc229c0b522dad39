"""CPU turns: co-located peers' forwards take turns on the cores they share, so that their
OpenMP threads do not fight over them (peers on disjoint cores never wait for each other); and
the policy that sets a peer's torch threads and decides whether its forwards take turns."""

import fcntl
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

log = logging.getLogger("layerswarm.scheduler")

TURN_WAIT_S = 2.0  # the longest a forward waits for its turn on shared cores


class CoreTurns:
    """Forwards of the peers that share a machine's cores, one at a time: an exclusive lock on
    a file per core, which every peer of this user on this machine running on that core opens
    (flock: released by the kernel if the holder dies, so no stale lock survives a killed peer).
    A forward takes the locks of all its cores, in core order (so no two peers wait on each
    other in a circle): peers whose cores overlap take turns, peers on disjoint cores do not.

    Co-located peers whose OpenMP threads together outnumber the cores must not compute at
    once: each parallel region then waits at its barriers for threads that another process's
    threads keep off the cores (README, "CPU threads", has the numbers).

    A turn is waited for at most `max_wait_s`: a holder that does not let go (a frozen process
    keeps its lock) must not stop the others. Past that, forwards run without turns until the
    lock comes free again (a thread of this object waits for it in the background)."""

    def __init__(
        self, path: str | None = None, max_wait_s: float = TURN_WAIT_S, cores: Iterable[int] | None = None
    ):
        """`path`: one lock file in place of the per-core ones; `cores`: those this peer's
        forwards run on (default: every core this process may use)."""
        cores = sorted(usable_cores() if cores is None else cores)
        self.paths = [path] if path else [core_lock_path(core) for core in cores]
        self.max_wait_s = max_wait_s
        self._fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in self.paths]
        self.turns = 0  # forwards run in a turn
        self.skipped = 0  # forwards run without one (a holder did not let go in time)
        self.wait_s = 0.0  # summed time spent waiting for the cores
        self._asks: queue.SimpleQueue = queue.SimpleQueue()
        self._state = threading.Lock()
        self._stuck: _Ask | None = None  # an ask given up on, still waiting for the lock
        self._held = False
        threading.Thread(target=self._serve_asks, name="core-turns", daemon=True).start()

    def _serve_asks(self) -> None:
        """In the background: take the lock for each ask; give it back at once if the asker
        gave up meanwhile."""
        while (ask := self._asks.get()) is not None:
            for fd in self._fds:
                fcntl.flock(fd, fcntl.LOCK_EX)
            with self._state:
                if ask.abandoned:
                    self._unlock()
                    self._stuck = None
                else:
                    ask.granted = True
                ask.done.set()
        for fd in self._fds:
            os.close(fd)

    def _unlock(self) -> None:
        for fd in reversed(self._fds):
            fcntl.flock(fd, fcntl.LOCK_UN)

    def __enter__(self) -> "CoreTurns":
        t0 = time.monotonic()
        with self._state:
            stuck = self._stuck is not None
        if not stuck:
            ask = _Ask()
            self._asks.put(ask)
            ask.done.wait(self.max_wait_s)
            with self._state:
                self._held = ask.granted
                if not ask.granted:
                    ask.abandoned = True
                    self._stuck = ask
                    log.warning(
                        "no turn on the cores within %.1f s (a co-located peer holds it and does not "
                        "let go): forwards run without turns until it does",
                        self.max_wait_s,
                    )
        self.wait_s += time.monotonic() - t0
        if self._held:
            self.turns += 1
        else:
            self.skipped += 1
        return self

    def __exit__(self, *exc) -> None:
        if self._held:
            self._held = False
            self._unlock()

    def close(self) -> None:
        self._asks.put(None)  # the thread closes the file once no ask waits for its lock


@dataclass(eq=False)
class _Ask:
    done: threading.Event = field(default_factory=threading.Event)
    granted: bool = False
    abandoned: bool = False


def core_lock_path(core: int) -> str:
    """One lock per user, machine and core (peers of one user share their machine's cores)."""
    folder = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(folder, f"layerswarm-{os.getuid()}-core-{core}.lock")


def usable_cores() -> tuple[int, ...]:
    """The cores this process may run on (its affinity: --cpus pins it), in order."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return tuple(range(os.cpu_count() or 1))


class TurnTaker(Protocol):
    """What the policy sets on a scheduler (inference/scheduler.py's Scheduler)."""

    colocated: bool
    turns: CoreTurns | None

    def run_in_compute(self, fn: Callable, *args) -> Awaitable[Any]: ...


class ThreadPolicy:
    """Torch threads of the compute thread: `threads` (--threads), else as many as the peer's own
    cores (--cpus), else OMP_NUM_THREADS, else every core. Co-located peers without cores of
    their own compute in turns (--core-turns, and waves: see SchedulerSettings.batch_wait_s) and
    their idle OpenMP threads sleep after a moment (--omp-wait-policy brief), so each may use all
    cores (README, "CPU threads"). A peer given its own cores shares them with no one: it takes
    no turns and waits for no waves unless --core-turns on (then only with the peers on its cores)."""

    def __init__(
        self,
        scheduler: TurnTaker,
        threads: int = 0,
        core_turns: str = "auto",
        device: str | None = None,
        cpus: tuple[int, ...] = (),
    ):
        """`core_turns`: on, off or auto (peers/config.py checks it); `device`: the block's;
        `cpus`: the cores this peer's process is pinned to, () for none of its own."""
        self.scheduler, self.core_turns, self.device, self.cpus = scheduler, core_turns, device, cpus
        env = os.environ.get("OMP_NUM_THREADS", "")
        omp = int(env) if env.isdigit() and int(env) > 0 else 0
        self.threads = threads or len(cpus) or omp or os.cpu_count() or 1
        self._turns: CoreTurns | None = None

    @property
    def cores(self) -> tuple[int, ...]:
        """The cores this peer's forwards run on: its own, else every core it may use."""
        return self.cpus or usable_cores()

    def set_threads(self) -> Awaitable[Any]:
        """Set the torch threads where forwards run (OpenMP's thread count belongs to the thread
        that sets it)."""
        return self.scheduler.run_in_compute(torch.set_num_threads, self.threads)

    def fit(self, colocated: int) -> None:
        """--core-turns: forwards take turns with the co-located peers' on the cores they share
        (see CoreTurns); auto while this CPU peer, without cores of its own, shares the machine
        and the peers' threads outnumber its cores."""
        shared = colocated > 1 and not self.cpus
        self.scheduler.colocated = shared
        cpu = torch.device(self.device or "cpu").type == "cpu"
        on = self.core_turns == "on" or (
            self.core_turns == "auto" and cpu and shared and colocated * self.threads > (os.cpu_count() or 1)
        )
        if on and self._turns is None:
            self._turns = CoreTurns(cores=self.cores)
        self.scheduler.turns = self._turns if on else None

    def close(self) -> None:
        if self._turns is not None:
            self._turns.close()


def colocated_peers(address: str, addresses: Iterable[str]) -> int:
    """How many of the live peers at `addresses` share this peer's host (itself included)."""
    host = address.rsplit(":", 1)[0]
    return max(1, sum(1 for a in addresses if a.rsplit(":", 1)[0] == host))
