"""What a peer measures of its own speed and of its links, for latency-aware routes: round-trip
times to the peers it hands steps on to (the acknowledgements of small frames: a gossip
exchange would time the merging of tables too), and its compute time per layer. Both are
published in its signed entry."""

import time
from collections import OrderedDict

from peers.swarm.membership import MAX_LINKS, MAX_MS

EMA = 0.2  # weight of a new sample
MAX_TRACKED = 256  # peers whose round-trip time is kept
FORGET_S = 30.0  # a compute time not refreshed by a forward for this long is no longer published


class Links:
    """Round-trip times to other peers (a moving average each), most recently measured last."""

    def __init__(self):
        self._rtt_s: OrderedDict[str, float] = OrderedDict()

    def observe(self, peer_id: str, seconds: float) -> None:
        old = self._rtt_s.pop(peer_id, None)
        self._rtt_s[peer_id] = seconds if old is None else (1 - EMA) * old + EMA * seconds
        while len(self._rtt_s) > MAX_TRACKED:
            self._rtt_s.popitem(last=False)

    def published(self) -> tuple[tuple[str, float], ...]:
        """The most recently measured MAX_LINKS, in ms, for this peer's entry."""
        recent = list(self._rtt_s.items())[-MAX_LINKS:]
        return tuple(sorted((pid, round(min(s * 1000, MAX_MS), 2)) for pid, s in recent))


class Speed:
    """This peer's compute time per layer of a forward of decode steps (a prefill would make a
    peer that just served one look slow), from the scheduler's counters."""

    def __init__(self, clock=time.monotonic):
        self.layer_ms = 0.0
        self._last = (0.0, 0)  # (compute seconds, forwards) at the last update
        self._clock = clock
        self._measured_at = 0.0

    def update(self, compute_s: float, forwards: int, layers: int) -> float:
        """Take the scheduler's counters (each gossip round); the time to publish. A peer that
        computed nothing for FORGET_S publishes none (a slow moment is not held against it)."""
        seconds, count = compute_s - self._last[0], forwards - self._last[1]
        self._last = (compute_s, forwards)
        now = self._clock()
        if count <= 0 and now - self._measured_at > FORGET_S:
            self.layer_ms = 0.0
        if count > 0 and layers > 0:
            self._measured_at = now
            sample = min(1000 * seconds / count / layers, MAX_MS)
            self.layer_ms = round(
                sample if not self.layer_ms else (1 - EMA) * self.layer_ms + EMA * sample, 3
            )
        return self.layer_ms
