"""The swarm table each peer keeps, merged by gossip (after SWIM and Scuttlebutt); pure data, driven
by peers/swarm/gossip.py. The records it holds, and their checks, are peers/swarm/record.py.

The rules: only an entry its owner signed is taken, and only the owner advances its heartbeat; a new
life has a larger incarnation and supersedes the old at once; a silent peer is suspect here after
`suspect_after_s` and dead here after `dead_after_s`, each peer's own finding and never gossiped (a
later signed heartbeat of that life brings it back); the one death that travels is a peer's own
signed tombstone, kept for `tombstone_s` so that stale gossip of that life cannot revive it.
A peer is vouched for once it answered this peer's dial at its address, as that life (one per
address); news of other peers is taken only within its source's rate, a new peer only within the
unvouched budget, entry by entry (peers/swarm/admission.py); gossip carries own and vouched entries.
"""

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from peers.swarm.admission import (
    DROP_EVICTED,
    DROP_EXPIRED,
    DROP_FULL,
    DROP_RATE,
    DROP_REASONS,
    MAX_UNVOUCHED_ENTRIES,
    Candidate,
    SourceBuckets,
    UnvouchedBudget,
    dial_back,
)
from peers.swarm.identity import Identity
from peers.swarm.record import (
    DEAD,
    JOINING,
    LEAVING,
    MAX_ENTRIES_PER_MESSAGE,
    MAX_LINKS,
    MAX_MS,
    MAX_TABLE_ENTRIES,
    SERVING,
    PeerRecord,
    new_incarnation,
    parse_entries,
    supersedes,
)

__all__ = [  # the record's names stay importable from here, where the table that holds them lives
    "DEAD",
    "JOINING",
    "LEAVING",
    "MAX_ENTRIES_PER_MESSAGE",
    "MAX_LINKS",
    "MAX_MS",
    "MAX_TABLE_ENTRIES",
    "MAX_UNVOUCHED_ENTRIES",
    "UNVOUCHED_DIALS_PER_ROUND",
    "SERVING",
    "GossipSettings",
    "PeerRecord",
    "Table",
    "new_incarnation",
    "parse_entries",
    "supersedes",
]

UNVOUCHED_DIALS_PER_ROUND = 4  # peers not vouched for yet that one round dials, in turn across sources


@dataclass(frozen=True)
class GossipSettings:
    interval_s: float = 1.0
    fanout: int = 3
    suspect_after_s: float = 4.0
    dead_after_s: float = 8.0
    tombstone_s: float = 60.0
    timeout_s: float = 2.0  # one gossip exchange

    def __post_init__(self):
        for name in ("interval_s", "suspect_after_s", "dead_after_s", "tombstone_s", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"gossip {name} must be positive, got {getattr(self, name)}")
        if self.fanout < 1:
            raise ValueError(f"gossip fanout must be >= 1, got {self.fanout}")
        if not self.interval_s < self.suspect_after_s < self.dead_after_s < self.tombstone_s:
            raise ValueError(
                "gossip timings must satisfy interval_s < suspect_after_s < dead_after_s < tombstone_s, "
                f"got {self.interval_s}, {self.suspect_after_s}, {self.dead_after_s}, {self.tombstone_s}"
            )


@dataclass
class _Local:
    entry: PeerRecord  # as its owner signed it
    seen_at: float  # when its version last advanced here
    died_at: float | None = None  # when it died: declared here, or its own tombstone arrived
    suspected: bool = False  # a failure report, until its heartbeat advances
    vouched: int | None = None  # the incarnation this peer answered with when this peer dialled it
    source: str = ""  # the host that brought it here
    since: float = 0.0  # when this table took the life it holds
    failures: int = 0  # dials of its address that another peer, or no one, answered
    dialled_at: float | None = None  # when this peer last dialled its address

    @property
    def is_vouched(self) -> bool:
        return self.vouched == self.entry.incarnation

    @property
    def dead(self) -> bool:
        return self.died_at is not None

    @property
    def declared_here(self) -> bool:
        """Dead by this peer's own finding (silence), not by its signed tombstone."""
        return self.died_at is not None and self.entry.state != DEAD


@dataclass
class Table:
    """This peer's view of the swarm, itself included. `me` is this peer's entry; the table
    fills in and signs its identity fields with `identity`."""

    me: PeerRecord
    identity: Identity
    settings: GossipSettings = field(default_factory=GossipSettings)
    clock: Callable[[], float] = time.monotonic
    _peers: dict[str, _Local] = field(default_factory=dict)
    deaths: deque = field(default_factory=lambda: deque(maxlen=1000))  # (peer_id, incarnation) declared here
    # entries not taken or let go, by reason (peers/swarm/admission.py's DROP_REASONS)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    buckets: SourceBuckets | None = None  # strangers' entries per source per minute (default: on this clock)

    def __post_init__(self):
        self.me = self.me.signed(self.identity)
        self._peers[self.me.peer_id] = _Local(self.me, self.clock())
        if self.buckets is None:
            self.buckets = SourceBuckets(clock=self.clock)

    # -- the owner's own entry -------------------------------------------------------------
    def update_me(self, **changes) -> PeerRecord:
        """Change this peer's own entry; every change is a new heartbeat, so gossip carries it."""
        changes.setdefault("heartbeat", self.me.heartbeat + 1)
        self.me = replace(self.me, **changes).signed(self.identity)
        now = self.clock()
        self._peers[self.me.peer_id] = _Local(self.me, now, died_at=now if self.me.state == DEAD else None)
        return self.me

    def beat(self, load: int | None = None, **measured) -> PeerRecord:
        """Advance this peer's heartbeat (each gossip round), with its load and what it measured
        (layer_ms, links)."""
        return self.update_me(load=self.me.load if load is None else load, **measured)

    # -- gossip ----------------------------------------------------------------------------
    def merge(self, entries: list[PeerRecord], source: str = "") -> None:
        """Take what is news in `entries`, gossiped by `source` (the host that pushed them, or the
        host dialled). News of a peer not vouched for takes one of the source's tokens, and a new
        peer room in the unvouched budget, entry by entry; what does not fit is dropped (counted in
        `dropped`), and only the entries taken are verified. ValueError, and nothing merged, if an
        entry this table would take is not signed by its owner (honest peers relay only entries
        they checked)."""
        taken, evicted = self._admit(entries, source)
        for entry in taken:
            if not entry.verify():
                raise ValueError(f"the entry of peer {entry.peer_id} is not signed by its owner")
        for peer_id in evicted:
            del self._peers[peer_id]
        self.dropped[DROP_EVICTED] += len(evicted)
        now = self.clock()
        for entry in taken:
            if entry.peer_id == self.me.peer_id:
                # A version of this peer it does not have (a former life of this identity with a
                # clock ahead, or its own tombstone of a life it still lives): a newer life.
                self.update_me(incarnation=max(entry.incarnation + 1, new_incarnation()), heartbeat=0)
                continue
            if entry.peer_id not in evicted:
                self._take(entry, source, now)

    def _admit(self, entries: list[PeerRecord], source: str) -> tuple[list[PeerRecord], set[str]]:
        """The entries of a message to take, and the unvouched peers that give way for them: news
        of peers vouched for is taken; news of another peer takes a token of `source`'s, and a
        new peer room too (peers/swarm/admission.py)."""
        taken, new, evicted = [], {}, set()
        budget = None
        for entry in entries:
            if entry.peer_id in new:  # twice in one message: the later version, if it is later
                if supersedes(entry, new[entry.peer_id]):
                    taken.append(entry)
                    new[entry.peer_id] = entry
                continue
            if not self._news(entry):
                continue
            if not self._vouched_here(entry.peer_id):
                if not self.buckets.take(source):
                    self.dropped[DROP_RATE] += 1
                    continue
                if entry.peer_id not in self._peers:
                    budget = budget or self._budget()
                    fits, victim = budget.room_for(source)
                    if not fits:
                        self.dropped[DROP_FULL] += 1
                        continue
                    if victim is not None:
                        evicted.add(victim)
                    new[entry.peer_id] = entry
            taken.append(entry)
        return taken, evicted

    def _vouched_here(self, peer_id: str) -> bool:
        """This peer, or one vouched for (as the life the table holds)."""
        local = self._peers.get(peer_id)
        return peer_id == self.me.peer_id or (local is not None and local.is_vouched)

    def screen(self, source: str) -> Callable[[object], bool]:
        """Which raw entries of a message from `source` are worth reading (parse_entries' `keep`):
        those of this peer and of peers vouched for, and as many others as `source` holds tokens
        for; the rest, which merge would drop, are dropped unread (and counted)."""
        tokens = self.buckets.available(source)

        def keep(item) -> bool:
            nonlocal tokens
            peer_id = item.get("peer_id") if isinstance(item, dict) else None
            if isinstance(peer_id, str) and self._vouched_here(peer_id):
                return True
            if tokens < 1:
                self.dropped[DROP_RATE] += 1
                return False
            tokens -= 1
            return True

        return keep

    def _budget(self) -> UnvouchedBudget:
        return UnvouchedBudget(len(self._peers), self._unvouched(), MAX_TABLE_ENTRIES, MAX_UNVOUCHED_ENTRIES)

    def _unvouched(self, live: bool = False) -> list[Candidate]:
        """The entries of other peers not vouched for (only the live ones, with `live`)."""
        return [
            Candidate(
                p,
                local.source,
                local.since,
                local.failures + local.dead,
                local.entry.address,
                local.dialled_at,
            )
            for p, local in self._peers.items()
            if p != self.me.peer_id and not local.is_vouched and not (live and local.dead)
        ]

    def _take(self, entry: PeerRecord, source: str, now: float) -> None:
        """Merge one checked entry of another peer."""
        known = self._peers.get(entry.peer_id)
        died = now - max(0.0, entry.dead_for_s) if entry.state == DEAD else None
        if known is None:
            # its own tombstone is kept too, so that stale gossip of that life cannot revive it; it
            # keeps its age, so that tombstones expire everywhere
            self._peers[entry.peer_id] = _Local(
                replace(entry, dead_for_s=0.0), now, died_at=died, source=source, since=now
            )
        elif supersedes(entry, known.entry):
            same_life = entry.incarnation == known.entry.incarnation and entry.address == known.entry.address
            self._peers[entry.peer_id] = _Local(
                replace(entry, dead_for_s=0.0),
                now,
                died_at=died,
                vouched=known.vouched if entry.address == known.entry.address else None,
                source=known.source,
                since=known.since if same_life else now,
                failures=known.failures if same_life else 0,
                dialled_at=known.dialled_at,
            )
        elif died is not None and known.died_at is not None:
            known.died_at = min(known.died_at, died)

    def _news(self, entry: PeerRecord) -> bool:
        """Whether merging `entry` would change this table."""
        if entry.peer_id == self.me.peer_id:
            return (entry.state == DEAD and entry.incarnation >= self.me.incarnation) or supersedes(
                entry, self.me
            )
        if entry.state == DEAD and entry.dead_for_s > self.settings.tombstone_s:
            return False  # an expired tombstone: dropped everywhere, not bounced around
        known = self._peers.get(entry.peer_id)
        if known is None:
            return True  # (whether it fits is the budget's question: _admit)
        if supersedes(entry, known.entry):
            return True
        return entry.state == DEAD and entry.version == known.entry.version and known.died_at is not None

    def entries(self) -> list[PeerRecord]:
        """Every entry that could be gossiped: live entries and unexpired tombstones of peers that
        left (with their age); deaths found here stay here."""
        now = self.clock()
        return [self._gossiped(local, now) for local in self._peers.values() if not local.declared_here]

    def outgoing(self, limit: int = MAX_ENTRIES_PER_MESSAGE, rng: random.Random = random) -> list[PeerRecord]:
        """What this peer gossips: its own entry, then those of the peers it vouched for (a random
        sample of them past `limit`), never a stranger's: an entry no one dialled reaches only the
        peers its source pushed it to, and no message is longer than a receiver takes."""
        now, me = self.clock(), self.me.peer_id
        vouched = [
            self._gossiped(local, now)
            for p, local in self._peers.items()
            if p != me and local.is_vouched and not local.declared_here
        ]
        if len(vouched) > limit - 1:
            vouched = rng.sample(vouched, limit - 1)
        return [self._gossiped(self._peers[me], now), *vouched]

    @staticmethod
    def _gossiped(local: _Local, now: float) -> PeerRecord:
        return replace(local.entry, dead_for_s=now - local.died_at) if local.dead else local.entry

    def known(self) -> list[PeerRecord]:
        """Every peer this table holds, the dead included (for people to read, not to gossip)."""
        return [local.entry for local in self._peers.values()]

    def sweep(self) -> list[str]:
        """Declare peers dead whose heartbeat stopped; drop old tombstones, and entries still not
        vouched for after `tombstone_s`. Returns the newly dead."""
        now, s = self.clock(), self.settings
        newly_dead = []
        for peer_id, local in list(self._peers.items()):
            if peer_id == self.me.peer_id:
                continue
            if local.dead:
                if now - local.died_at > s.tombstone_s:
                    del self._peers[peer_id]
                continue
            if not local.is_vouched and now - local.since > s.tombstone_s:
                del self._peers[peer_id]
                self.dropped[DROP_EXPIRED] += 1
                continue
            silent = now - local.seen_at
            if silent > s.dead_after_s or (local.suspected and silent > s.suspect_after_s):
                local.died_at = now
                newly_dead.append(peer_id)
                self.deaths.append((peer_id, local.entry.incarnation))
        return newly_dead

    def forgive(self) -> None:
        """Restart every live peer's silence clock (after this process itself stalled)."""
        now = self.clock()
        for peer_id, local in self._peers.items():
            if not local.dead and peer_id != self.me.peer_id:
                local.seen_at = now

    def report_failure(self, peer_id: str) -> None:
        """An entry saw a hop to this peer fail: suspect it until its heartbeat advances."""
        local = self._peers.get(peer_id)
        if local is not None and peer_id != self.me.peer_id:
            local.suspected = True
            local.seen_at = min(local.seen_at, self.clock())

    def gossip_targets(self, seeds: list[str], rng: random.Random = random) -> list[str]:
        """Addresses to exchange tables with: `fanout` random live peers vouched for; up to
        UNVOUCHED_DIALS_PER_ROUND live peers not vouched for yet, the least recently dialled first,
        in turn across the sources that brought them (so that a newcomer is vouched for within a
        round or two however many entries strangers bring); and one seed not (or no longer) known
        alive: a seed that was down when this peer started is retried, so that peers started
        together cannot stay split in two swarms."""
        live = [local for p, local in self._peers.items() if p != self.me.peer_id and not local.dead]
        vouched = [local for local in live if local.is_vouched]
        chosen = rng.sample(vouched, min(self.settings.fanout, len(vouched)))
        targets = list(dict.fromkeys(local.entry.address for local in chosen))
        for address in dial_back(self._unvouched(live=True), UNVOUCHED_DIALS_PER_ROUND):
            if address not in targets:
                targets.append(address)
        known = {local.entry.address for local in live} | {self.me.address}
        unknown = [s for s in seeds if s not in known]
        if unknown:
            targets.append(rng.choice(unknown))
        return targets

    def vouch(self, peer_id: str, incarnation: int) -> None:
        """This peer dialled `peer_id`'s address and it proved, as that life, that it is there
        (then no other peer is vouched for at that address)."""
        local = self._peers.get(peer_id)
        if local is not None:
            self.dialled(local.entry.address, peer_id, incarnation)

    def dialled(self, address: str, peer_id: str | None = None, incarnation: int | None = None) -> None:
        """This peer dialled `address`, and `peer_id` proved that it answers there as `incarnation`
        (None: no one proved anything). Any other entry naming the address failed its dial-back:
        it is not vouched for, and gives way first when room is needed."""
        now = self.clock()
        for p, local in self._peers.items():
            if p == self.me.peer_id or local.entry.address != address:
                continue
            local.dialled_at = now
            if p == peer_id and local.entry.incarnation == incarnation:
                local.vouched, local.failures = incarnation, 0
            elif peer_id is not None or not local.is_vouched:  # (a vouched peer may just be slow)
                local.vouched = None
                local.failures += 1

    def vouched(self, peer_id: str) -> bool:
        """Whether the peer answered this peer at its address, as the life the table holds (a
        peer only heard of, or one that names another's address, is not routed to)."""
        return self._vouched_here(peer_id)

    # -- reading -----------------------------------------------------------------------------
    def status(self, peer_id: str) -> str | None:
        """The state as this peer sees it: the gossiped state, 'suspect' when silent, 'dead'
        when declared dead here."""
        local = self._peers.get(peer_id)
        if local is None:
            return None
        if local.dead:
            return DEAD
        if peer_id != self.me.peer_id:
            silent = self.clock() - local.seen_at
            if local.suspected or silent > self.settings.suspect_after_s:
                return "suspect"
        return local.entry.state

    def serving(self, model: str) -> list[PeerRecord]:
        """Peers that can take new sessions of `model`: serving, not suspect, and vouched for
        (they answered this peer at their address as the life the table holds)."""
        return [
            local.entry
            for peer_id, local in self._peers.items()
            if local.entry.model == model
            and local.entry.state == SERVING
            and self.status(peer_id) == SERVING
            and self.vouched(peer_id)
        ]

    def get(self, peer_id: str) -> PeerRecord | None:
        """The entry of a peer, as its owner signed it (None if unknown)."""
        local = self._peers.get(peer_id)
        return local.entry if local is not None else None

    def live(self) -> list[PeerRecord]:
        """Peers not dead, as far as this peer knows."""
        return [local.entry for local in self._peers.values() if not local.dead]
