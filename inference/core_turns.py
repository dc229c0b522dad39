"""CPU turns: co-located peers' forwards take turns on the cores they share, so that their
OpenMP threads do not fight over them."""

import fcntl
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("layerswarm.scheduler")

TURN_WAIT_S = 2.0  # the longest a forward waits for its turn on shared cores


class CoreTurns:
    """Forwards of the peers that share a machine's cores, one at a time: an exclusive lock on
    a file that every peer of this user on this machine opens (flock: released by the kernel if
    the holder dies, so no stale lock survives a killed peer).

    Co-located peers whose OpenMP threads together outnumber the cores must not compute at
    once: each parallel region then waits at its barriers for threads that another process's
    threads keep off the cores (README, "CPU threads", has the numbers).

    A turn is waited for at most `max_wait_s`: a holder that does not let go (a frozen process
    keeps its lock) must not stop the others. Past that, forwards run without turns until the
    lock comes free again (a thread of this object waits for it in the background)."""

    def __init__(self, path: str | None = None, max_wait_s: float = TURN_WAIT_S):
        self.path = path or default_turns_path()
        self.max_wait_s = max_wait_s
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
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
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            with self._state:
                if ask.abandoned:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    self._stuck = None
                else:
                    ask.granted = True
                ask.done.set()
        os.close(self._fd)

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
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._asks.put(None)  # the thread closes the file once no ask waits for its lock


@dataclass(eq=False)
class _Ask:
    done: threading.Event = field(default_factory=threading.Event)
    granted: bool = False
    abandoned: bool = False


def default_turns_path() -> str:
    """One lock per user and machine (peers of one user share their machine's cores)."""
    folder = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(folder, f"layerswarm-{os.getuid()}-cores.lock")
