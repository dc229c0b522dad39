"""Admission at arrival: one FIFO queue (within a priority) in front of an entry's generation.

A request holds KV on every peer of its route (its prompt, plus max_tokens per sequence): it is
admitted when that fits what this entry believes its routes' peers can hold beside what it has
admitted already, and fewer than --max-requests run here. The queue holds at most --max-waiting
more: past --max-requests + --max-waiting requests in all, one more is refused at once (Overloaded:
429), as vLLM's waiting queue: a wait for a running place alone is never refused below that bound.
One whose expected wait for KV passes --max-queue-wait is refused at once (its Retry-After that
wait), before its prompt is tokenized, as is one that needs KV before any request has ended (no
wait can be estimated yet); a queued one is never overtaken by a later one of the same priority,
and never refused for waiting. What peers can hold is learned: at first
each peer holds this entry's own budget; a peer that answers an admitted request "no room"
lowers it to what this entry holds, and every request that ends raises it again, a little.
"""

import asyncio
import bisect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from peers.entry.generation import RETRY_AFTER_S
from peers.transport.errors import Overloaded

__all__ = ["Admission", "Ticket", "kv_tokens"]

DRAIN_DECAY = 0.8  # of the drain rate's past, kept at each request's end (the rest is forgotten)
RECOVERY = 0.25  # of a finished request's tokens, the room a learned limit gets back


def kv_tokens(prompt_tokens: int, max_tokens: int, sequences: int = 1) -> int:
    """The KV token slots a request may hold on each peer of its route."""
    return prompt_tokens + sequences * max_tokens


@dataclass(eq=False)
class Ticket:
    """One request's place: in the queue (`admitted` not done), then admitted until released."""

    tokens: int  # the KV token slots it may hold (an estimate until its prompt is tokenized)
    priority: int  # lower goes first; FIFO within one
    order: int  # arrival order (a requeued ticket gets one before every other)
    admitted: asyncio.Future = field(repr=False)  # its result: when it was admitted (monotonic)
    released: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return self.priority, self.order


class Admission:
    """The queue and the room of one entry: enter() waits for room or refuses at once; release()
    frees it; requeue() puts an admitted request that a full peer refused back at the head.
    `max_running` (None: no bound) requests run at once, and `max_waiting` more may wait."""

    def __init__(
        self,
        budget_tokens: int,
        max_wait_s: float,
        max_running: int | None = None,
        max_waiting: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if budget_tokens < 1 or max_wait_s <= 0:
            raise ValueError(
                f"admission needs a positive budget and wait, got budget_tokens={budget_tokens}, "
                f"max_wait_s={max_wait_s}"
            )
        if (max_running is not None and max_running < 1) or max_waiting < 0:
            raise ValueError(
                f"admission needs max_running >= 1 and max_waiting >= 0, got max_running={max_running}, "
                f"max_waiting={max_waiting}"
            )
        self.budget_tokens, self.max_wait_s = budget_tokens, max_wait_s
        self.max_running, self.max_waiting = max_running, max_waiting
        self.limit_tokens = budget_tokens  # what the peers hold for this entry, as learned
        self.clock = clock
        self.waiting: list[Ticket] = []  # by key: the head first
        self.running: set[Ticket] = set()
        self.held_tokens = 0  # of the running tickets
        # the rate at which requests' KV drains (their tokens, as they end, over the time this
        # entry had requests running), each past end weighing DRAIN_DECAY times the next
        self._drained_tokens, self._drained_s = 0.0, 0.0
        self._since = 0.0  # the last end, or the start of the running period
        self.refused = 0
        self._order, self._front = 0, 0

    def set_budget(self, tokens: int) -> None:
        """What the peers of this entry's routes can hold, before anything is learned."""
        tokens = max(1, tokens)
        if tokens != self.budget_tokens:
            self.limit_tokens = min(tokens, self.limit_tokens + max(0, tokens - self.budget_tokens))
            self.budget_tokens = tokens
            self._pump()

    def fits(self, tokens: int) -> bool:
        """Whether a request of `tokens` could start now (one alone always may)."""
        if self.max_running is not None and len(self.running) >= self.max_running:
            return False
        if not self.running:
            return True
        return self.held_tokens + tokens <= self.limit_tokens

    @property
    def full(self) -> bool:
        """Whether one more request, running or queued, would pass max_running + max_waiting."""
        if self.max_running is None:
            return False
        return len(self.running) + len(self.waiting) >= self.max_running + self.max_waiting

    @property
    def drain_rate(self) -> float | None:
        """KV token slots freed per second while requests run here (None: none ended yet)."""
        return self._drained_tokens / self._drained_s if self._drained_s > 0 else None

    def expected_wait_s(self, tokens: int, priority: int = 0) -> float | None:
        """How long a request of `tokens` arriving now would wait for room: 0 where it starts at
        once; None where no request has ended yet to tell. The tokens held and queued ahead of
        it beyond what fits must drain first, at the measured rate, and as many running
        requests as there are ahead of it past max_running must end (each holding the mean)."""
        ahead = [t for t in self.waiting if t.priority <= priority]
        if not ahead and self.fits(tokens):
            return 0.0
        rate = self.drain_rate
        if rate is None:
            return None
        return max(self._excess_tokens(tokens, ahead), self._ends_tokens(len(ahead)), 1) / rate

    def _excess_tokens(self, tokens: int, ahead: list[Ticket]) -> int:
        """The KV tokens past the limit, were this request admitted after those `ahead`."""
        return self.held_tokens + sum(t.tokens for t in ahead) + tokens - self.limit_tokens

    def _ends_tokens(self, ahead: int) -> float:
        """The tokens of the running requests that must end before a running place is free for
        a request with `ahead` before it (each as much as the mean of those running)."""
        if self.max_running is None or not self.running:
            return 0.0
        ends = len(self.running) + ahead + 1 - self.max_running
        return max(0, ends) * self.held_tokens / len(self.running)

    def enter(self, tokens: int, priority: int = 0) -> Ticket:
        """A ticket, admitted or queued (then wait() for it); Overloaded at once where the queue
        is full or the wait would pass max_wait_s (before any request has ended, a wait for a
        running place only is queued, a wait for KV refused; a wait for a running place alone is
        never refused below the queue's bound). Nothing here awaits: a refusal
        costs no turn of the event loop."""
        if self.full:
            self.refused += 1
            raise Overloaded(self._full_refusal(), self._place_wait_s())
        wait_s = self.expected_wait_s(tokens, priority)
        ahead = [t for t in self.waiting if t.priority <= priority]
        excess, rate = self._excess_tokens(tokens, ahead), self.drain_rate
        kv_wait_s = None if excess > 0 and rate is None else max(excess, 0) / (rate or 1)
        if wait_s != 0 and (kv_wait_s is None or kv_wait_s > self.max_wait_s):
            self.refused += 1
            raise Overloaded(self._refusal(kv_wait_s), math.ceil(kv_wait_s or self.max_wait_s))
        self._order += 1
        ticket = Ticket(tokens, priority, self._order, asyncio.get_running_loop().create_future())
        if wait_s == 0:
            self._admit(ticket)
        else:
            bisect.insort(self.waiting, ticket, key=lambda t: t.key)
        return ticket

    async def wait(self, ticket: Ticket) -> None:
        """Until `ticket` is admitted (cancelled while queued: it leaves the queue; once
        admitted: it is released)."""
        if ticket.admitted.done():
            return
        try:
            await asyncio.shield(ticket.admitted)
        except asyncio.CancelledError:
            if ticket in self.waiting:
                self.waiting.remove(ticket)
                self._pump()  # (a smaller one behind it may fit now)
            else:
                self.release(ticket, finished=False)
            raise

    def _full_refusal(self) -> str:
        return (
            f"this peer already has {len(self.running)} requests running and {len(self.waiting)} "
            f"waiting (--max-requests {self.max_running}, --max-waiting {self.max_waiting}); retry "
            "later or use another peer"
        )

    def _place_wait_s(self) -> int:
        """Retry-After for a full queue: until a running request is expected to end (1 s before
        any has ended)."""
        rate = self.drain_rate
        if rate is None or not self.running:
            return RETRY_AFTER_S
        return max(RETRY_AFTER_S, math.ceil(self.held_tokens / len(self.running) / rate))

    def _refusal(self, wait_s: float | None) -> str:
        queue = f"{len(self.running)} requests run here and {len(self.waiting)} wait"
        if wait_s is None:
            return f"no room for this request now ({queue}); retry later or use another peer"
        return (
            f"no room for this request within --max-queue-wait {self.max_wait_s:g} s ({queue}; the "
            f"expected wait is {wait_s:.1f} s); retry later or use another peer"
        )

    def resize(self, ticket: Ticket, tokens: int) -> None:
        """The ticket's true size, once its prompt is tokenized."""
        if ticket in self.running:
            self.held_tokens += tokens - ticket.tokens
        ticket.tokens = tokens
        self._pump()

    def release(self, ticket: Ticket, finished: bool = True) -> None:
        """The request ended (`finished`: it ran to its end, and its tokens count as drained)."""
        if ticket.released:
            return
        ticket.released = True
        if ticket in self.waiting:
            self.waiting.remove(ticket)
        elif ticket in self.running:
            self.running.discard(ticket)
            self.held_tokens -= ticket.tokens
            if finished:
                now = self.clock()
                self._drained_tokens = self._drained_tokens * DRAIN_DECAY + ticket.tokens
                self._drained_s = self._drained_s * DRAIN_DECAY + (now - self._since)
                self._since = now
                gain = max(1, int(ticket.tokens * RECOVERY))
                self.limit_tokens = min(self.budget_tokens, self.limit_tokens + gain)
        self._pump()

    def requeue(self, ticket: Ticket) -> bool:
        """A peer had no room for admitted `ticket` before its first token: where this entry
        holds other requests (whose ends will free room), learn that the peers hold no more than
        those, and put it back at the head of the queue (True); else False: nothing of this
        entry's will free room, so the caller refuses it now."""
        if ticket not in self.running or len(self.running) == 1:
            return False
        self.running.discard(ticket)
        self.held_tokens -= ticket.tokens
        self.limit_tokens = max(1, min(self.limit_tokens, self.held_tokens))
        self._front -= 1
        ticket.order, ticket.admitted = self._front, asyncio.get_running_loop().create_future()
        bisect.insort(self.waiting, ticket, key=lambda t: t.key)
        self._pump()
        return True

    def _admit(self, ticket: Ticket) -> None:
        if not self.running:
            self._since = self.clock()  # (time with nothing running drains nothing)
        self.running.add(ticket)
        self.held_tokens += ticket.tokens
        ticket.admitted.set_result(self.clock())

    def _pump(self) -> None:
        """Admit from the head while it fits: never one behind a head that does not."""
        while self.waiting and self.fits(self.waiting[0].tokens):
            ticket = self.waiting.pop(0)
            if not ticket.admitted.done():
                self._admit(ticket)

    def to_json(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "held_tokens": self.held_tokens,
            "limit_tokens": self.limit_tokens,
            "budget_tokens": self.budget_tokens,
            "max_running": self.max_running,
            "max_waiting": self.max_waiting,
            "drain_tokens_per_s": self.drain_rate,
            "refused": self.refused,
        }
