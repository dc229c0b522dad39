"""Per-session KV caches of one block, and the store that bounds them: a token budget shared
fairly among the senders that open sessions, reservations that grow with use, idle expiry,
eviction (senders over their share first) and explicit close."""

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import CacheFullError, RequestTooLarge, SessionError

FIRST_TOKENS = 16  # a session's first reservation, in positions (and the unit reservations round to)
GROW_TOKENS = 256  # capacity doubles while below this many positions, then grows by this many
EVICT_IDLE_S = 30.0  # only sessions idle this long may be evicted (a step may queue for a while)
OVER_SHARE_IDLE_S = 5.0  # a sender over its fair share loses sessions idle this long to others
MAX_SESSION_SHARE = 0.5  # of the budget, the most one session may hold
STRANGER_SHARE = 0.25  # of the budget, the most one sender not vouched for may hold
STRANGERS_SHARE = 0.5  # of the budget, the most all senders not vouched for may hold together
MAX_CLOSED_IDS = 65536  # closed session ids remembered (refused if a late step reopens them)


@dataclass(frozen=True)
class Sender:
    """Who opened a session: a key naming it (a peer's host, or this process) and whether it is
    vouched for (a member of a private swarm, or a host where a vouched peer lives)."""

    key: str
    vouched: bool = False


LOCAL = Sender("local", vouched=True)  # this process's own steps (its own hop, a local chain)


class SessionCache:
    """Keys and values of one session for the layers of one block, in preallocated buffers.

    The decoder layers call `update` (transformers' Cache protocol); `advance` commits the step.
    """

    def __init__(self, session_id: str, batch: int):
        self.session_id = session_id
        self.batch = batch
        self.length = 0  # positions committed
        self.capacity = 0  # positions allocated
        self.layers = (0, 0)  # the global layers [a, b) this session runs
        self.rewind_floor: int | None = None  # after a drafted step: the earliest position to go back to
        self.last_used = time.monotonic()
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lease = None  # a slot of static buffers holding its keys and values (inference/kv_slots.py)
        self._slot_positions = 0  # positions that slot holds
        self.sender = LOCAL  # who opened it (the fair share it counts against: CacheStore)

    @property
    def slot(self) -> int | None:
        return None if self.lease is None else self.lease.slot

    @property
    def slot_positions(self) -> int:
        return self._slot_positions if self.lease is not None else 0

    def bind(self, lease, buffers: dict[int, tuple[torch.Tensor, torch.Tensor]], positions: int) -> None:
        """Keep keys and values in a leased slot's buffers ([1, kv_heads, positions, head_dim] per
        layer) instead of buffers of its own, until it needs more positions or sequences. The slot
        is released when the session leaves it or is dropped."""
        assert self.batch == 1 and not self._kv and self.lease is None, "only a fresh session binds"
        assert self.capacity <= positions, f"capacity {self.capacity} over the slot's {positions}"
        self.lease, self._kv, self._slot_positions = lease, dict(buffers), positions
        weakref.finalize(self, lease.release)

    def _leave_slot(self) -> None:
        """Copy what the slot holds into buffers of its own and give the slot back."""
        self._kv = {
            layer: (k[:, :, : self.capacity].clone(), v[:, :, : self.capacity].clone())
            for layer, (k, v) in self._kv.items()
        }
        lease, self.lease = self.lease, None
        lease.release()

    def grow_to(self, capacity: int) -> None:
        if self.lease is not None:
            if capacity <= self._slot_positions:
                self.capacity = capacity
                return
            self._leave_slot()
        self.capacity = capacity
        for layer, (k, v) in list(self._kv.items()):
            self._kv[layer] = (_resized(k, capacity), _resized(v, capacity))

    def write(self, layer: int, row: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store one sequence's new keys and values [1, kv_heads, T, head_dim] at `start`."""
        end = start + key.shape[2]
        assert end <= self.capacity, f"step to {end} over capacity {self.capacity}"
        if layer not in self._kv:
            shape = (self.batch, key.shape[1], self.capacity)  # (MLA's values are narrower than its keys)
            self._kv[layer] = (
                key.new_empty((*shape, key.shape[3])),
                value.new_empty((*shape, value.shape[3])),
            )
        k, v = self._kv[layer]
        k[row : row + 1, :, start:end] = key
        v[row : row + 1, :, start:end] = value

    def read(self, layer: int, row: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [1, kv_heads, end, head_dim] of one sequence (views, no copy)."""
        k, v = self._kv[layer]
        return k[row : row + 1, :, :end], v[row : row + 1, :, :end]

    def widen(self, batch: int) -> None:
        """A session of one sequence becomes `batch` sequences that share what it holds."""
        assert self.batch == 1, f"only a session of one sequence widens, this one has {self.batch}"
        if self.lease is not None:
            self._leave_slot()
        self.batch = batch
        for layer, (k, v) in list(self._kv.items()):
            self._kv[layer] = (k.expand(batch, -1, -1, -1).clone(), v.expand(batch, -1, -1, -1).clone())

    def advance(self, steps: int) -> None:
        self.length += steps

    def rewind(self, length: int) -> None:
        """Forget the positions from `length` on (drafted tokens that were not accepted); the
        buffers stay allocated and the next step overwrites them. The caller checks that going
        back is allowed (Block: only into the last drafted step)."""
        assert 0 < length <= self.length, f"rewind to {length} of a session holding {self.length}"
        self.length = length


def grown(capacity: int, needed: int) -> int:
    """The capacity a session that needs `needed` positions grows to: double what it holds (at
    least FIRST_TOKENS more, at most GROW_TOKENS), rounded up to FIRST_TOKENS, so that a session
    holds about what it uses (a one-position step reserves FIRST_TOKENS) and grows rarely."""
    step = min(max(capacity, FIRST_TOKENS), GROW_TOKENS)
    return max(-(-needed // FIRST_TOKENS) * FIRST_TOKENS, capacity + step)


def _slots(session: SessionCache) -> int:
    """Token slots a session holds in the budget (a leased static slot's are the pool's)."""
    return 0 if session.lease is not None else session.batch * session.capacity


def _share(session: SessionCache) -> int:
    """Token slots a session counts against its sender's share: a leased slot's positions too
    (a sender not vouched for must not hold the pool's slots beyond its share)."""
    return session.batch * session.capacity


def _resized(t: torch.Tensor, capacity: int) -> torch.Tensor:
    out = t.new_empty((*t.shape[:2], capacity, t.shape[3]))
    n = min(capacity, t.shape[2])
    out[:, :, :n] = t[:, :, :n]
    return out


class CacheStore:
    """All sessions of one block. Usage is counted in token slots: batch x allocated positions.

    Fair admission: a session counts against the sender that opened it. A sender not vouched for
    holds at most STRANGER_SHARE of the budget, and such senders together STRANGERS_SHARE; a step
    that would pass either is refused (CacheFullError). When the budget is full, room is made by
    evicting, least recently used first: for a vouched sender, sessions of senders not vouched for
    idle OVER_SHARE_IDLE_S; for a sender under its fair share (the budget over the senders holding
    sessions), sessions of senders over theirs (and not vouched where it is not) idle as long;
    then any session idle EVICT_IDLE_S. A vouched sender may use room nobody else wants.
    """

    def __init__(self, max_tokens: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be positive, got {idle_timeout_s}")
        self.max_tokens = max_tokens
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._sessions: OrderedDict[str, SessionCache] = OrderedDict()  # least recently used first
        self._closed: OrderedDict[str, float] = OrderedDict()  # session id -> when it was closed
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def used_tokens(self) -> int:
        """Token slots held in sessions' own buffers (a session in a leased static slot holds
        the pool's memory, which was taken out of the budget: inference/cuda_graphs.py)."""
        return sum(_slots(s) for s in self._sessions.values())

    def held_by(self, sender: Sender) -> int:
        """Token slots the sessions a sender opened hold (by its key)."""
        with self._lock:
            return sum(_share(s) for s in self._sessions.values() if s.sender.key == sender.key)

    def open(
        self, session_id: str, batch: int, refuse_closed: bool = False, sender: Sender = LOCAL
    ) -> SessionCache:
        """A fresh cache for `session_id`, counted against `sender`; an existing one of that id is
        dropped first. With refuse_closed, a session closed within the idle timeout is not opened
        again (SessionError)."""
        with self._lock:
            if refuse_closed and self.closed_recently(session_id):
                raise SessionError(f"session {session_id!r} was closed")
            self._sessions.pop(session_id, None)
            session = SessionCache(session_id, batch)
            session.last_used, session.sender = self._clock(), sender
            self._sessions[session_id] = session
            return session

    def get(self, session_id: str) -> SessionCache:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionError(
                    f"unknown session {session_id!r} (never opened, closed, evicted or expired)"
                )
            session.last_used = self._clock()
            self._sessions.move_to_end(session_id)
            return session

    def touch(self, session_id: str) -> None:
        """A step of this session is on its way: it is in use, not idle."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.last_used = self._clock()

    def find(self, session_id: str) -> SessionCache | None:
        with self._lock:
            return self._sessions.get(session_id)

    def reserve(self, session: SessionCache, new_tokens: int) -> None:
        """Make room for `new_tokens` more positions of `session` (growing as `grown` says),
        evicting as the class says if the budget requires; CacheFullError if the session alone
        cannot fit, if its sender is over its share, or if active sessions hold the room."""
        needed = session.length + new_tokens
        if needed <= session.capacity:
            return
        self._check_size(session, session.batch, needed)
        capacity = min(grown(session.capacity, needed), self.max_session_tokens // session.batch)
        held = 0 if session.lease is not None else session.capacity  # (a slot's are the pool's)
        with self._lock:
            if session.lease is None or capacity > session.slot_positions:
                self._make_room(session, session.batch * (capacity - held))
            else:  # growing inside its slot: the budget is untouched, the sender's share is not
                self._admit(session, session.batch * (capacity - session.capacity))
            session.grow_to(capacity)

    def widen(self, session: SessionCache, batch: int) -> None:
        """Turn a session of one sequence into `batch` sequences sharing its positions (n > 1
        completions of one prompt); CacheFullError if the budget cannot hold them."""
        self._check_size(session, batch, session.capacity)
        held = 0 if session.lease is not None else session.batch * session.capacity
        with self._lock:
            self._make_room(session, batch * session.capacity - held)
            session.widen(batch)

    def _check_size(self, session: SessionCache, batch: int, positions: int) -> None:
        """RequestTooLarge if a session of `batch` x `positions` could never be held: over the
        budget, or over the share one session may hold (so that one request cannot take a
        peer's whole cache from everyone else)."""
        slots = batch * positions
        what = f"session {session.session_id!r} needs {slots} KV token slots (batch {batch} x {positions} positions)"
        if slots > self.max_tokens:
            raise RequestTooLarge(f"{what}; the cache budget is {self.max_tokens}")
        if slots > self.max_session_tokens:
            raise RequestTooLarge(
                f"{what}; one session may hold at most {self.max_session_tokens} "
                f"({MAX_SESSION_SHARE:.0%} of the cache budget of {self.max_tokens})"
            )

    @property
    def max_session_tokens(self) -> int:
        return max(1, int(self.max_tokens * MAX_SESSION_SHARE))

    def _make_room(self, session: SessionCache, extra: int) -> None:
        """Admit `extra` more token slots of `session`'s sender, then evict (see the class) until
        they fit; CacheFullError if active sessions hold the room. Caller holds the lock."""
        self._admit(session, extra)
        held: dict[str, int] = {}
        for s in self._sessions.values():
            held[s.sender.key] = held.get(s.sender.key, 0) + _slots(s)
        used, asker, now = sum(held.values()), session.sender, self._clock()
        if used + extra <= self.max_tokens:
            return
        fair = self.max_tokens // len({k for k, v in held.items() if v} | {asker.key})
        passes: list[Callable[[SessionCache], bool]] = []
        if asker.vouched:
            passes.append(lambda s: not s.sender.vouched and now - s.last_used >= OVER_SHARE_IDLE_S)
        if held.get(asker.key, 0) + extra <= fair:
            passes.append(
                lambda s: (
                    s.sender.key != asker.key
                    and held[s.sender.key] > fair
                    and (asker.vouched or not s.sender.vouched)
                    and now - s.last_used >= OVER_SHARE_IDLE_S
                )
            )
        passes.append(lambda s: now - s.last_used >= EVICT_IDLE_S)
        for may_evict in passes:
            for other_id, other in list(self._sessions.items()):  # least recently used first
                if used + extra <= self.max_tokens:
                    return
                if other_id != session.session_id and may_evict(other):
                    del self._sessions[other_id]
                    used, held[other.sender.key] = (
                        used - _slots(other),
                        held[other.sender.key] - _slots(other),
                    )
        if used + extra > self.max_tokens:
            raise CacheFullError(
                f"the KV cache is full: {used} of {self.max_tokens} token slots are held by "
                f"active sessions; session {session.session_id!r} needs {extra} more"
            )

    def _admit(self, session: SessionCache, extra: int) -> None:
        """CacheFullError if `extra` more token slots would take a sender not vouched for past
        STRANGER_SHARE of the budget, or such senders together past STRANGERS_SHARE; its own
        sessions idle EVICT_IDLE_S go first. Caller holds the lock."""
        asker = session.sender
        if asker.vouched:
            return
        mine = sum(_share(s) for s in self._sessions.values() if s.sender.key == asker.key)
        strangers = sum(_share(s) for s in self._sessions.values() if not s.sender.vouched)
        limit, pool, now = self.stranger_tokens, int(self.max_tokens * STRANGERS_SHARE), self._clock()
        for other_id, other in list(self._sessions.items()):  # least recently used first
            if mine + extra <= limit and strangers + extra <= pool:
                break
            own = other_id != session.session_id and other.sender.key == asker.key
            if own and now - other.last_used >= EVICT_IDLE_S:
                del self._sessions[other_id]
                mine, strangers = mine - _share(other), strangers - _share(other)
        what = f"session {session.session_id!r} needs {extra} more KV token slots"
        if mine + extra > limit:
            raise CacheFullError(
                f"{what}; its sender {asker.key} is not vouched for and holds {mine}, of the {limit} "
                f"one such sender may hold ({STRANGER_SHARE:.0%} of the cache budget of {self.max_tokens})"
            )
        if strangers + extra > pool:
            raise CacheFullError(
                f"{what}; senders not vouched for hold {strangers}, of the {pool} they may hold together "
                f"({STRANGERS_SHARE:.0%} of the cache budget of {self.max_tokens})"
            )

    @property
    def stranger_tokens(self) -> int:
        """The most token slots one sender not vouched for may hold."""
        return max(1, int(self.max_tokens * STRANGER_SHARE))

    def close(self, session_id: str) -> bool:
        """Free a session; its id is remembered for a while so that a step still travelling
        cannot open it again."""
        with self._lock:
            self._closed[session_id] = self._clock()
            while len(self._closed) > MAX_CLOSED_IDS:
                self._closed.popitem(last=False)
            return self._sessions.pop(session_id, None) is not None

    def closed_recently(self, session_id: str) -> bool:
        at = self._closed.get(session_id)
        return at is not None and self._clock() - at < self.idle_timeout_s

    def expire(self) -> list[str]:
        """Drop sessions idle longer than the timeout; returns their ids."""
        now = self._clock()
        with self._lock:
            dead = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_timeout_s]
            for sid in dead:
                del self._sessions[sid]
            return dead
