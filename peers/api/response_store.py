"""The responses a peer keeps for previous_response_id and GET /v1/responses/{id}: in memory, on
the peer that answered them, bounded in count (MAX_STORED_RESPONSES: the oldest goes first) and
in age (STORED_RESPONSE_TTL_S). A response asked with `store: false` is never put here."""

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_STORED_RESPONSES = 1000
STORED_RESPONSE_TTL_S = 3600.0


@dataclass(frozen=True)
class Stored:
    """A kept response: its Response object and its conversation (the earlier responses' items,
    its input items, its output items), which a response continuing it starts from."""

    body: dict
    items: tuple
    stored_at_s: float


class ResponseStore:
    """Responses by id, oldest first; `clock()` gives seconds (monotonic)."""

    def __init__(
        self,
        max_responses: int = MAX_STORED_RESPONSES,
        ttl_s: float = STORED_RESPONSE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_responses < 1 or ttl_s <= 0:
            raise ValueError(
                f"a store keeps at least one response for some time, got {max_responses}, {ttl_s} s"
            )
        self.max_responses, self.ttl_s, self.clock = max_responses, ttl_s, clock
        self.records: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        self.expire()
        return len(self.records)

    def put(self, rid: str, body: dict, items: list) -> None:
        """Keep a response (the oldest one goes where the store is full)."""
        self.expire()
        self.records[rid] = Stored(body, tuple(items), self.clock())
        self.records.move_to_end(rid)
        while len(self.records) > self.max_responses:
            self.records.popitem(last=False)

    def get(self, rid: str) -> Stored | None:
        """The kept response `rid`; None where it was never kept, was deleted or has expired."""
        self.expire()
        return self.records.get(rid)

    def delete(self, rid: str) -> bool:
        """Forget `rid`: whether it was kept."""
        self.expire()
        return self.records.pop(rid, None) is not None

    def expire(self) -> None:
        """Drop the responses older than the TTL (stored in time order: from the front)."""
        now = self.clock()
        while self.records:
            oldest = next(iter(self.records.values()))
            if now - oldest.stored_at_s < self.ttl_s:
                break
            self.records.popitem(last=False)
