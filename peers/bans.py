"""Peers an entry avoids after they failed: the ban doubles with each repeat; it is lifted by a
success through that peer or by a new life (incarnation) of it."""

import time
from dataclasses import dataclass


@dataclass
class _Ban:
    until: float
    strikes: int
    incarnation: int


class Bans:
    def __init__(self, first_s: float, max_s: float, clock=time.monotonic):
        self.first_s, self.max_s, self.clock = first_s, max_s, clock
        self._bans: dict[str, _Ban] = {}

    def ban(self, peer_id: str, incarnation: int) -> float:
        now = self.clock()
        for p in [p for p, b in self._bans.items() if b.until + self.max_s < now]:
            del self._bans[p]  # long expired: its strikes are forgiven (keeps the map bounded)
        old = self._bans.get(peer_id)
        strikes = old.strikes + 1 if old and old.incarnation == incarnation else 1
        duration = min(self.max_s, self.first_s * 2 ** (strikes - 1))
        self._bans[peer_id] = _Ban(now + duration, strikes, incarnation)
        return duration

    def banned(self, incarnations: dict[str, int]) -> set[str]:
        now = self.clock()
        return {
            p
            for p, b in self._bans.items()
            if b.until > now and incarnations.get(p, b.incarnation) == b.incarnation
        }

    def proven(self, peer_id: str) -> None:
        self._bans.pop(peer_id, None)
