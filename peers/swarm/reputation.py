"""Peers an entry avoids after they failed: the ban doubles with each repeat; it is lifted by a
success through that peer or by a new life (incarnation) of it. A peer convicted of computing
wrong is banned for a fixed time whatever life it starts, and no success lifts it."""

import time
from dataclasses import dataclass

MAX_CONVICTED = 4096


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
