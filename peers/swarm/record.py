"""A peer's gossip record and its checks: what one peer signs about itself, and how a
received entry is validated field by field before any table takes it.

A peer is its Ed25519 identity (peers/swarm/identity.py): its peer id is derived from its public key,
and it signs every version of its own entry, its address included, so that no one can forge, move or
revive another peer's entry. The table that merges these records is peers/swarm/membership.py.

Peers of different versions gossip together: an entry may leave out the fields a newer version
added (an older peer's: they take their defaults) and carry fields this version does not know (a
newer peer's: kept, bounded, and passed on as they came). The signature covers exactly the
fields the owner sent, so neither can be added, stripped or changed by anyone else.
"""

import json
import re
import time
from dataclasses import asdict, dataclass, replace

from peers.swarm.checks import finite_number
from peers.swarm.identity import PEER_ID_CHARS, SIGNATURE_CHARS, Identity, peer_id_of, verify
from peers.swarm.seals import check_seal_key

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
# an entry's fields that every version sends; the others may be left out by an older peer
REQUIRED_FIELDS = frozenset(
    {"peer_id", "model", "total_layers", "start", "end", "state", "incarnation", "heartbeat"}
    | {"address", "public_key", "signature", "dead_for_s", "seal_key"}
)
MAX_UNKNOWN_FIELDS = 8  # fields of a newer version an entry may carry
MAX_UNKNOWN_CHARS = 1024  # JSON characters of each one (name included)
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]{2,45}\]")


# what a peer found of its own reachability (peers/swarm/reach.py): not known yet, dialled back, or not
DIRECT, UNREACHABLE = "direct", "none"
REACH = ("", DIRECT, UNREACHABLE)


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
    seal_key: str = (
        ""  # X25519, unpadded base64url: shadow instructions are sealed to it (peers/swarm/seals.py)
    )
    reach: str = (
        ""  # "direct": peers dialled it back; "none": none could; "": not known (peers/swarm/reach.py)
    )
    # (not fields of the entry itself) an older owner's fields it left out; a newer owner's fields
    # this version does not know, as (name, canonical JSON): both as signed, passed on as they came
    absent: frozenset[str] = frozenset()
    unknown: tuple[tuple[str, str], ...] = ()

    @property
    def version(self) -> tuple[int, int]:
        return self.incarnation, self.heartbeat

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in self.absent and k not in _NOT_SENT}
        return out | {name: json.loads(value) for name, value in self.unknown}

    def signed_message(self) -> bytes:
        fields = {k: v for k, v in self.to_json().items() if k not in ("signature", "dead_for_s")}
        return b"layerswarm-entry\0" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, identity: Identity) -> "PeerRecord":
        """This entry as `identity`'s own, signed."""
        mine = replace(
            self,
            peer_id=identity.peer_id,
            public_key=identity.public_key,
            seal_key=identity.seal_key,
            signature="",
        )
        return replace(mine, signature=identity.sign(mine.signed_message()))

    def verify(self) -> bool:
        """Whether its owner signed exactly this (from_json checked that the key owns the id)."""
        return verify(self.public_key, self.signature, self.signed_message())

    @classmethod
    def from_json(cls, data: dict, now_us: int | None = None) -> "PeerRecord":
        """A gossiped entry, checked field by field (ValueError names the first bad one)."""
        if not isinstance(data, dict):
            raise ValueError(f"a peer entry must be an object, got {type(data).__name__}")
        missing = sorted(REQUIRED_FIELDS - data.keys())
        if missing:
            raise ValueError(f"a peer entry has the fields {sorted(REQUIRED_FIELDS)}; missing {missing}")
        known = cls.__dataclass_fields__.keys() - _NOT_SENT
        absent, unknown = frozenset(known - data.keys()), _unknown_fields(data, known)
        data = {name: data.get(name, cls.__dataclass_fields__[name].default) for name in known}
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
            check_seal_key(data["seal_key"]),
            _reach(data["reach"]),
            absent,
            unknown,
        )


def supersedes(new: PeerRecord, old: PeerRecord) -> bool:
    """Whether gossip of `new` replaces `old` (same peer): a later life wins; within one life
    its own tombstone is final, otherwise the later heartbeat wins."""
    if new.incarnation != old.incarnation:
        return new.incarnation > old.incarnation
    if old.state == DEAD:
        return False
    return new.state == DEAD or new.heartbeat > old.heartbeat


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


_NOT_SENT = frozenset({"absent", "unknown"})


def _unknown_fields(data: dict, known) -> tuple[tuple[str, str], ...]:
    """A newer version's fields of an entry, bounded, as (name, canonical JSON)."""
    names = sorted(data.keys() - known)
    if len(names) > MAX_UNKNOWN_FIELDS:
        raise ValueError(
            f"a peer entry carries at most {MAX_UNKNOWN_FIELDS} unknown fields, got {len(names)}"
        )
    out = []
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"an unknown field's name is 1 to 64 of a-z 0-9 _, got {name!r:.40}")
        value = json.dumps(data[name], sort_keys=True, separators=(",", ":"))
        if len(name) + len(value) > MAX_UNKNOWN_CHARS:
            raise ValueError(f"the unknown field {name} is longer than {MAX_UNKNOWN_CHARS} characters")
        out.append((name, value))
    return tuple(out)


def _reach(value) -> str:
    if value not in REACH:
        raise ValueError(f"reach must be '', 'direct' or 'none', got {value!r:.40}")
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


def parse_entries(items, now_us: int | None = None, keep=None) -> list[PeerRecord]:
    """The entries of one gossip message (ValueError if it is not a list of valid entries, or
    longer than MAX_ENTRIES_PER_MESSAGE). `keep`, if given, is asked of each raw entry in turn
    before it is read: one it refuses is skipped unread (see Table.screen)."""
    if not isinstance(items, list):
        raise ValueError("entries must be a list")
    if len(items) > MAX_ENTRIES_PER_MESSAGE:
        raise ValueError(
            f"a gossip message carries at most {MAX_ENTRIES_PER_MESSAGE} entries, got {len(items)}"
        )
    now_us = _now_us() if now_us is None else now_us
    out = []
    for i, item in enumerate(items):
        if keep is not None and not keep(item):
            continue
        try:
            out.append(PeerRecord.from_json(item, now_us))
        except (ValueError, TypeError) as e:
            raise ValueError(f"entry {i}: {e}") from None
    return out


def new_incarnation() -> int:
    """A new life's incarnation: the start time in microseconds (each process life has a larger one)."""
    return _now_us()


def _now_us() -> int:
    return time.time_ns() // 1000
