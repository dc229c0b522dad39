"""What a table takes from strangers: entries of peers not vouched for, per source per minute (a
token bucket each), and which unvouched entry gives way when their budget is full (one whose
dial-back failed, else the oldest of the source holding the most), so that no one source crowds
out the others."""

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

MAX_UNVOUCHED_ENTRIES = 256  # entries this peer has not dialled yet (or whose dial-back failed)
NEW_ENTRIES_PER_SOURCE_PER_MINUTE = 256  # also the burst: a newcomer learns a swarm at once
MAX_SOURCES = 4096  # buckets kept; the least recently used is forgotten first

# why an entry was not taken, or was let go (Table.dropped)
DROP_RATE = "rate"  # its source sent more entries of strangers than its share per minute
DROP_FULL = "full"  # no room in the unvouched budget, and its source holds its fair share
DROP_EVICTED = "evicted"  # an unvouched entry that gave way to another source's
DROP_EXPIRED = "expired"  # an unvouched entry that stayed unvouched too long
DROP_REASONS = (DROP_RATE, DROP_FULL, DROP_EVICTED, DROP_EXPIRED)


class SourceBuckets:
    """A token bucket per source (a remote host): each entry of a peer not vouched for that a
    source brings (new, or news of it) takes a token; `per_minute` tokens come back in a minute,
    up to `per_minute` held."""

    def __init__(
        self,
        per_minute: int = NEW_ENTRIES_PER_SOURCE_PER_MINUTE,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = MAX_SOURCES,
    ):
        if per_minute < 1 or max_sources < 1:
            raise ValueError(
                f"a bucket needs per_minute >= 1 and max_sources >= 1, got {per_minute}, {max_sources}"
            )
        self.capacity, self.rate_per_s = float(per_minute), per_minute / 60.0
        self.clock, self.max_sources = clock, max_sources
        self._levels: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, at)

    def available(self, source: str) -> int:
        """How many tokens `source` holds now (none taken)."""
        tokens, at = self._levels.get(source, (self.capacity, self.clock()))
        return int(min(self.capacity, tokens + (self.clock() - at) * self.rate_per_s))

    def take(self, source: str) -> bool:
        """Take one token of `source`'s (False, and nothing taken, when it has none left)."""
        now = self.clock()
        tokens, at = self._levels.pop(source, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate_per_s)
        taken = tokens >= 1.0
        self._levels[source] = (tokens - 1.0 if taken else tokens, now)
        while len(self._levels) > self.max_sources:
            self._levels.popitem(last=False)
        return taken


@dataclass(eq=False)
class Candidate:
    """An unvouched entry as the budget sees it."""

    peer_id: str
    source: str
    added_at: float  # when this table first took it
    failures: int  # dial-backs of its address it did not answer as itself (a death found here: one)
    address: str = ""
    dialled_at: float | None = None  # when this peer last dialled its address


@dataclass
class UnvouchedBudget:
    """Room for new entries during one merge: at most `max_total` entries in all and
    `max_unvouched` unvouched ones. `room_for` says whether a new entry of a source fits, and
    which unvouched entry must give way for it (never a vouched one)."""

    total: int
    candidates: Iterable[Candidate]
    max_total: int
    max_unvouched: int = MAX_UNVOUCHED_ENTRIES
    _by_source: dict[str, list[Candidate]] = field(default_factory=dict, init=False)  # oldest last
    _counts: dict[str, int] = field(default_factory=dict, init=False)  # with this merge's new ones
    _failed: list[Candidate] = field(default_factory=list, init=False)  # the first to give way last
    unvouched: int = field(default=0, init=False)

    def __post_init__(self):
        for c in sorted(self.candidates, key=lambda c: c.added_at, reverse=True):
            self._by_source.setdefault(c.source, []).append(c)
            self._counts[c.source] = self._counts.get(c.source, 0) + 1
            self.unvouched += 1
        self._failed = sorted(
            (c for group in self._by_source.values() for c in group if c.failures),
            key=lambda c: (c.failures, -c.added_at),  # most failures, then the oldest, last
        )

    def room_for(self, source: str) -> tuple[bool, str | None]:
        """Whether a new entry of `source` fits, and the peer id that gives way for it (if any);
        counts it in when it fits."""
        victim = None
        if self.total < self.max_total and self.unvouched < self.max_unvouched:
            self.total += 1
            self.unvouched += 1
        else:
            victim = self._victim(source)
            if victim is None:
                return False, None
            self._by_source[victim.source].remove(victim)
            self._counts[victim.source] -= 1
            if victim in self._failed:
                self._failed.remove(victim)
        self._counts[source] = self._counts.get(source, 0) + 1
        return True, victim.peer_id if victim is not None else None

    def _victim(self, source: str) -> Candidate | None:
        """An entry whose dial-back failed, else the oldest of the source holding the most, if it
        holds at least two more than `source` (so that two sources do not swap entries forever).
        This merge's own new entries never give way within it."""
        if self._failed:
            return self._failed[-1]
        mine = self._counts.get(source, 0)
        held = [s for s, group in self._by_source.items() if group]
        largest = max(held, key=lambda s: self._counts[s], default=None)
        if largest is None or self._counts[largest] < mine + 2:
            return None
        return self._by_source[largest][-1]


def dial_back(unvouched: list[Candidate], limit: int) -> list[str]:
    """Up to `limit` addresses of `unvouched` entries to dial: each source's least recently dialled
    (never dialled first, then the oldest), one source after another, so that one source bringing
    many entries delays another's by one dial at most."""
    queues: dict[str, list[Candidate]] = {}
    for c in sorted(unvouched, key=_dial_key)[::-1]:  # the first to dial last
        queues.setdefault(c.source, []).append(c)
    addresses: list[str] = []
    while queues and len(addresses) < limit:
        for source in sorted(queues, key=lambda s: _dial_key(queues[s][-1])):
            address = queues[source].pop().address
            if address not in addresses and len(addresses) < limit:
                addresses.append(address)
            if not queues[source]:
                del queues[source]
    return addresses


def _dial_key(c: Candidate) -> tuple[bool, float, float]:
    return c.dialled_at is not None, c.dialled_at or 0.0, c.added_at
