"""Whom an entry avoids, and why: failure accounting in one place. A peer at fault is banned (doubling
per repeat; lifted by a success through it or a new life of it); a convicted one for a fixed time
across lives; a busy or full peer is not at fault."""

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from peers.swarm.commitments import VerificationStats
from peers.swarm.membership import Table

log = logging.getLogger("layerswarm.peer")

MAX_CONVICTED = 4096
SHOWN_CONVICTED = 64  # the latest convictions, with why, kept for /health
AT_FAULT = "failed"  # the one failure reason that bans (see HopFailed.REASONS)
MESSAGE_CHARS = 300  # of a failure's message, kept in the log


@dataclass
class _Ban:
    until: float
    strikes: int
    incarnation: int


class Bans:
    def __init__(self, first_s: float, max_s: float, clock=time.monotonic):
        self.first_s, self.max_s, self.clock = first_s, max_s, clock
        self._bans: dict[str, _Ban] = {}
        self._convicted: dict[str, float] = {}  # peer -> until

    def ban(self, peer_id: str, incarnation: int) -> float:
        now = self.clock()
        for p in [p for p, b in self._bans.items() if b.until + self.max_s < now]:
            del self._bans[p]  # long expired: its strikes are forgiven (keeps the map bounded)
        old = self._bans.get(peer_id)
        strikes = old.strikes + 1 if old and old.incarnation == incarnation else 1
        duration = min(self.max_s, self.first_s * 2 ** (strikes - 1))
        self._bans[peer_id] = _Ban(now + duration, strikes, incarnation)
        return duration

    def convict(self, peer_id: str, duration_s: float) -> None:
        """Ban for `duration_s`, across lives (a liar restarting is still a liar)."""
        self._convicted[peer_id] = max(self._convicted.get(peer_id, 0.0), self.clock() + duration_s)
        if len(self._convicted) > MAX_CONVICTED:  # forget the convictions that end first
            for p in sorted(self._convicted, key=self._convicted.get)[: len(self._convicted) - MAX_CONVICTED]:
                del self._convicted[p]

    def convicted(self, peer_id: str) -> bool:
        return self._convicted.get(peer_id, 0.0) > self.clock()

    def banned(self, incarnations: dict[str, int]) -> set[str]:
        now = self.clock()
        return {
            p
            for p, b in self._bans.items()
            if b.until > now and incarnations.get(p, b.incarnation) == b.incarnation
        } | {p for p, until in self._convicted.items() if until > now}

    def proven(self, peer_id: str) -> None:
        self._bans.pop(peer_id, None)


class Reputation:
    """An entry's failure accounting (Petals' sequence manager's `on_request_failure` and
    `on_request_success`): every failed hop is counted and logged; a peer at fault is banned and
    reported to the table; a success through peers lifts their bans. Retries and backoff are
    the caller's (the entry's generation loop)."""

    def __init__(
        self,
        bans: Bans,
        table: Table,
        log: deque[dict],
        count: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        verification: VerificationStats | None = None,
    ):
        """`log`: the latest failures (for the swarm page); `count(reason)`: called once per
        failure (the peer's failover counters); `verification`: where convictions are shown."""
        self.bans, self.table, self.log, self.count, self.clock = bans, table, log, count, clock
        self.verification = verification if verification is not None else VerificationStats()

    def convict(self, peer_id: str, seconds: float, why: str) -> None:
        """A peer computed wrong (outvoted, or accused with evidence): avoid it for `seconds`, any
        life; keep why among the latest convictions and log it with its address."""
        self.bans.convict(peer_id, seconds)
        convicted = self.verification.convicted
        convicted[peer_id] = why
        while len(convicted) > SHOWN_CONVICTED:
            del convicted[next(iter(convicted))]
        entry = self.table.get(peer_id)
        address = entry.address if entry else "?"
        log.warning("peer %s (%s) convicted: %s; avoided for %.0f s", peer_id, address, why, seconds)

    def banned_now(self) -> set[str]:
        """The peers to route around now: banned in their current life, or convicted."""
        incarnations = {e.peer_id: e.incarnation for e in self.table.live()}
        return self.bans.banned(incarnations)

    def on_request_failure(self, peer_id: str, reason: str, message: str) -> float | None:
        """A hop through `peer_id` failed for `reason`: count and log it; ban the peer if it is at
        fault. Returns the ban's duration in seconds, or None where nobody is banned."""
        if self.count is not None:
            self.count(reason)
        self.log.append(
            {"at": self.clock(), "peer_id": peer_id, "reason": reason, "message": message[:MESSAGE_CHARS]}
        )
        if reason != AT_FAULT:
            return None
        entry = next((x for x in self.table.live() if x.peer_id == peer_id), None)
        duration = self.bans.ban(peer_id, entry.incarnation if entry else 0)
        self.table.report_failure(peer_id)
        return duration

    def on_request_success(self, peer_ids: Iterable[str]) -> None:
        """A step went through these peers after a failure: their bans are lifted."""
        for peer_id in peer_ids:
            self.bans.proven(peer_id)
