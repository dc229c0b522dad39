"""The swarm table each peer keeps, merged by gossip (heartbeats with suspicion, incarnations and
tombstones, after SWIM and Scuttlebutt). Pure data: the gossip loop lives in the server.

A peer is its Ed25519 identity (peers/swarm/identity.py): its peer id is derived from its public key,
and it signs every version of its own entry, its address included. An entry is taken from gossip
only with its owner's valid signature, so no one can forge, move or revive another peer's entry.
Each process life has a new, larger incarnation, so a restarted peer supersedes its previous life
at once; the owner alone advances its heartbeat. A peer whose heartbeat has not advanced for
`suspect_after_s` is suspect here (no new routes), and for `dead_after_s` dead here: a death is
each peer's own finding, never taken from gossip, so no one can kill another peer's entry either;
a later heartbeat of that life, signed by its owner, brings it back. The one death that travels is
a peer's own signed tombstone (it left), kept for `tombstone_s` so that stale gossip of that life
cannot bring it back.
"""

import json
import random
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from peers.swarm.checks import finite_number
from peers.swarm.identity import PEER_ID_CHARS, SIGNATURE_CHARS, Identity, peer_id_of, verify

JOINING, SERVING, LEAVING, DEAD = "joining", "serving", "leaving", "dead"
STATES = (JOINING, SERVING, LEAVING, DEAD)

# Bounds on what gossip may carry (everything a peer receives is validated before it is used)
MAX_ENTRIES_PER_MESSAGE = 1024
MAX_TABLE_ENTRIES = MAX_ENTRIES_PER_MESSAGE  # peers one table holds (all of it fits one message)
MAX_LAYERS = 4096
MAX_MODEL_ID = 256
MAX_CLOCK_AHEAD_S = 300.0  # an incarnation (a start time in microseconds) at most this far ahead
MAX_COUNTER = 2**53  # heartbeats and loads
MAX_LINKS = 16  # round-trip times an entry publishes
MAX_MS = 600_000.0  # the largest time an entry may publish
MAX_WIRE_NAMES = 8  # encodings of hidden states an entry announces it accepts (peers/transport/wire.py)
MAX_WIRE_NAME = 16  # characters of one
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]{2,45}\]")


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


@dataclass(frozen=True)
class PeerRecord:
    """What the swarm knows of one peer, signed by its owner (who alone changes it)."""

    peer_id: str  # derived from its public key
    model: str
    total_layers: int
    start: int
    end: int
    state: str = JOINING
    incarnation: int = 0
    heartbeat: int = 0
    load: int = 0  # sessions open on it
    dead_for_s: float = 0.0  # on a tombstone: how long ago the sender saw the death (not signed)
    address: str = ""  # what others dial, host:port
    public_key: str = ""  # Ed25519, unpadded base64url
    signature: str = ""  # the owner's, over every other field but dead_for_s
    layer_ms: float = 0.0  # its recent compute time per layer of a forward (0: not measured yet)
    links: tuple[tuple[str, float], ...] = ()  # (peer id, round-trip ms) to peers it talks to
    wire: tuple[str, ...] = ("lossless",)  # encodings of hidden states it accepts (peers/transport/wire.py)

    @property
    def version(self) -> tuple[int, int]:
        return self.incarnation, self.heartbeat

    def to_json(self) -> dict:
        return asdict(self)

    def signed_message(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k not in ("signature", "dead_for_s")}
        return b"layerswarm-entry\0" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, identity: Identity) -> "PeerRecord":
        """This entry as `identity`'s own, signed."""
        mine = replace(self, peer_id=identity.peer_id, public_key=identity.public_key, signature="")
        return replace(mine, signature=identity.sign(mine.signed_message()))

    def verify(self) -> bool:
        """Whether its owner signed exactly this (from_json checked that the key owns the id)."""
        return verify(self.public_key, self.signature, self.signed_message())

    @classmethod
    def from_json(cls, data: dict, now_us: int | None = None) -> "PeerRecord":
        """A gossiped entry, checked field by field (ValueError names the first bad one)."""
        if not isinstance(data, dict):
            raise ValueError(f"a peer entry must be an object, got {type(data).__name__}")
        names = cls.__dataclass_fields__.keys()
        if data.keys() != names:
            missing, extra = sorted(names - data.keys()), sorted(data.keys() - names)
            raise ValueError(
                f"a peer entry has the fields {sorted(names)}; missing {missing}, unknown {extra}"
            )
        peer_id = data["peer_id"]
        if (
            not isinstance(peer_id, str)
            or len(peer_id) != PEER_ID_CHARS
            or peer_id != peer_id_of(data["public_key"])
        ):
            raise ValueError(f"peer_id must be the id its public_key owns, got {peer_id!r:.40}")
        signature = data["signature"]
        if not isinstance(signature, str) or len(signature) != SIGNATURE_CHARS:
            raise ValueError("signature must be 64 bytes in unpadded base64url")
        address = check_address(data["address"])
        model = data["model"]
        if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_ID or not model.isprintable():
            raise ValueError(f"model must be a printable string of 1 to {MAX_MODEL_ID} characters")
        total = _int(data, "total_layers", 1, MAX_LAYERS)
        start, end = _int(data, "start", 0, total), _int(data, "end", 0, total)
        state = data["state"]
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        if start > end or (start == end and state == SERVING):
            raise ValueError(f"layers {start}:{end} are not a range of a {state} peer")
        now_us = _now_us() if now_us is None else now_us
        incarnation = _int(data, "incarnation", 0, now_us + int(MAX_CLOCK_AHEAD_S * 1e6))
        dead_for = data["dead_for_s"]
        if not finite_number(dead_for):
            raise ValueError(f"dead_for_s must be a finite number, got {dead_for!r}")
        if dead_for < 0:
            raise ValueError(f"dead_for_s must be >= 0, got {dead_for}")
        return cls(
            peer_id,
            model,
            total,
            start,
            end,
            state,
            incarnation,
            _int(data, "heartbeat", 0, MAX_COUNTER),
            _int(data, "load", 0, MAX_COUNTER),
            float(dead_for),
            address,
            data["public_key"],
            signature,
            _ms(data["layer_ms"], "layer_ms"),
            _links(data["links"]),
            _wire(data["wire"]),
        )


def check_address(value) -> str:
    """A peer's address: host:port and nothing else (no scheme, path, user or query)."""
    if not isinstance(value, str) or len(value) > 262:
        raise ValueError(f"an address must be a string host:port, got {value!r:.80}")
    host, sep, port = value.rpartition(":")
    if (
        not sep
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or len(port) > 5
        or not (_HOST.fullmatch(host) or _IPV6.fullmatch(host))
    ):
        raise ValueError(f"an address must be host:port, got {value!r:.80}")
    return value


def _ms(value, name: str) -> float:
    if not finite_number(value) or not 0 <= value <= MAX_MS:
        raise ValueError(f"{name} must be a number of milliseconds in [0, {MAX_MS:g}], got {value!r:.40}")
    return float(value)


def _links(value) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, list | tuple) or len(value) > MAX_LINKS:
        raise ValueError(f"links must be a list of at most {MAX_LINKS} [peer id, ms] pairs")
    out = []
    for item in value:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or len(item[0]) != PEER_ID_CHARS
        ):
            raise ValueError(f"a link must be [peer id, ms], got {item!r:.60}")
        out.append((item[0], _ms(item[1], "a link's ms")))
    return tuple(out)


def _wire(value) -> tuple[str, ...]:
    """The encodings an entry accepts: names this version may not know are kept (and never
    chosen), so that a newer peer's entry still merges."""
    if not isinstance(value, list | tuple) or not 0 < len(value) <= MAX_WIRE_NAMES:
        raise ValueError(f"wire must be a list of 1 to {MAX_WIRE_NAMES} encoding names")
    for name in value:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_WIRE_NAME or not name.isprintable():
            raise ValueError(
                f"a wire encoding is a name of 1 to {MAX_WIRE_NAME} characters, got {name!r:.40}"
            )
    if len(set(value)) < len(value):
        raise ValueError(f"wire names an encoding twice: {list(value)!r:.80}")
    return tuple(value)


def _int(data: dict, name: str, low: int, high: int) -> int:
    value = data[name]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r:.40}")
    return value


def parse_entries(items, now_us: int | None = None) -> list[PeerRecord]:
    """The entries of one gossip message (ValueError if it is not a list of valid entries, or
    longer than MAX_ENTRIES_PER_MESSAGE)."""
    if not isinstance(items, list):
        raise ValueError("entries must be a list")
    if len(items) > MAX_ENTRIES_PER_MESSAGE:
        raise ValueError(
            f"a gossip message carries at most {MAX_ENTRIES_PER_MESSAGE} entries, got {len(items)}"
        )
    now_us = _now_us() if now_us is None else now_us
    out = []
    for i, item in enumerate(items):
        try:
            out.append(PeerRecord.from_json(item, now_us))
        except (ValueError, TypeError) as e:
            raise ValueError(f"entry {i}: {e}") from None
    return out


def supersedes(new: PeerRecord, old: PeerRecord) -> bool:
    """Whether gossip of `new` replaces `old` (same peer): a later life wins; within one life
    its own tombstone is final, otherwise the later heartbeat wins."""
    if new.incarnation != old.incarnation:
        return new.incarnation > old.incarnation
    if old.state == DEAD:
        return False
    return new.state == DEAD or new.heartbeat > old.heartbeat


@dataclass
class _Local:
    entry: PeerRecord  # as its owner signed it
    seen_at: float  # when its version last advanced here
    died_at: float | None = None  # when it died: declared here, or its own tombstone arrived
    suspected: bool = False  # a failure report, until its heartbeat advances
    vouched: int | None = None  # the incarnation this peer answered with when this peer dialled it

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

    def __post_init__(self):
        self.me = self.me.signed(self.identity)
        self._peers[self.me.peer_id] = _Local(self.me, self.clock())

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
    def merge(self, entries: list[PeerRecord]) -> None:
        """Take what is news in `entries`. ValueError, and nothing merged, if an entry this table
        would take is not signed by its owner (honest peers relay only entries they checked)."""
        news = [e for e in entries if self._news(e)]
        for entry in news:
            if not entry.verify():
                raise ValueError(f"the entry of peer {entry.peer_id} is not signed by its owner")
        now = self.clock()
        for entry in news:
            if entry.peer_id == self.me.peer_id:
                # A version of this peer it does not have (a former life of this identity with a
                # clock ahead, or its own tombstone of a life it still lives): a newer life.
                self.update_me(incarnation=max(entry.incarnation + 1, _now_us()), heartbeat=0)
                continue
            known = self._peers.get(entry.peer_id)
            died = now - max(0.0, entry.dead_for_s) if entry.state == DEAD else None
            if known is None or supersedes(entry, known.entry):
                # its own tombstone is kept too, so that stale gossip of that life cannot revive
                # it; it keeps its age, so that tombstones expire everywhere
                vouched = known.vouched if known is not None else None
                self._peers[entry.peer_id] = _Local(
                    replace(entry, dead_for_s=0.0), now, died_at=died, vouched=vouched
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
            return len(self._peers) < MAX_TABLE_ENTRIES  # a full table takes no new peers
        if supersedes(entry, known.entry):
            return True
        return entry.state == DEAD and entry.version == known.entry.version and known.died_at is not None

    def entries(self) -> list[PeerRecord]:
        """Everything to gossip: live entries and unexpired tombstones of peers that left (with
        their age); deaths found here stay here."""
        now = self.clock()
        return [
            replace(local.entry, dead_for_s=now - local.died_at) if local.dead else local.entry
            for local in self._peers.values()
            if not local.declared_here
        ]

    def known(self) -> list[PeerRecord]:
        """Every peer this table holds, the dead included (for people to read, not to gossip)."""
        return [local.entry for local in self._peers.values()]

    def sweep(self) -> list[str]:
        """Declare peers dead whose heartbeat stopped; drop old tombstones. Returns the newly dead."""
        now, s = self.clock(), self.settings
        newly_dead = []
        for peer_id, local in list(self._peers.items()):
            if peer_id == self.me.peer_id:
                continue
            if local.dead:
                if now - local.died_at > s.tombstone_s:
                    del self._peers[peer_id]
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
        """Addresses to exchange tables with: a few random live peers, one live peer this peer
        has not dialled yet (so that a new peer is vouched for within a round), and one seed not
        (or no longer) known alive: a seed that was down when this peer started is retried, so
        that peers started together cannot stay split in two swarms."""
        live = [local for p, local in self._peers.items() if p != self.me.peer_id and not local.dead]
        chosen = rng.sample(live, min(self.settings.fanout, len(live)))
        unvouched = [
            local for local in live if local not in chosen and local.vouched != local.entry.incarnation
        ]
        if unvouched:
            chosen.append(rng.choice(unvouched))
        targets = list(dict.fromkeys(local.entry.address for local in chosen))
        known = {local.entry.address for local in live} | {self.me.address}
        unknown = [s for s in seeds if s not in known]
        if unknown:
            targets.append(rng.choice(unknown))
        return targets

    def vouch(self, peer_id: str, incarnation: int) -> None:
        """This peer dialled `peer_id`'s address and it proved, as that life, that it is there."""
        local = self._peers.get(peer_id)
        if local is not None:
            local.vouched = incarnation

    def vouched(self, peer_id: str) -> bool:
        """Whether the peer answered this peer at its address, as the life the table holds (a
        peer only heard of, or one that names another's address, is not routed to)."""
        local = self._peers.get(peer_id)
        return peer_id == self.me.peer_id or (local is not None and local.vouched == local.entry.incarnation)

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


def new_incarnation() -> int:
    return _now_us()


def _now_us() -> int:
    return time.time_ns() // 1000
