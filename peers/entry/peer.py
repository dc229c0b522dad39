"""What a request's generation needs of the peer it enters through: a small interface that the
composition root's node satisfies, so that the entry never imports the node."""

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

import httpx

from inference import Block
from peers.entry.speculative import Compute, SpeculationStats
from peers.swarm.commitments import Commitment, VerificationStats
from peers.swarm.membership import Table
from peers.swarm.reputation import Reputation
from peers.swarm.routing import Hop
from peers.transport.direct import Progress, Returns
from peers.transport.forwarder import Forwarder
from peers.transport.frames import StepRequest
from peers.transport.results import StepResult


class EntryOptions(Protocol):
    """The options an entry reads (peer serve's flags of the same names)."""

    address: str
    direct_return: bool
    failover_timeout_s: float
    prefix_reuse: bool
    self_referee: bool
    speculative: bool
    max_requests: int
    max_waiting: int
    sse_keepalive_s: float
    max_cache_tokens: int  # (the door's admission assumes each peer holds what this one does)
    scheduler: Any  # SchedulerSettings: max_queue_wait_s bounds a request's wait for room


class EntryPeer(Protocol):
    """The peer a request enters through, as the entry uses it."""

    config: EntryOptions
    peer_id: str
    model_id: str
    model_config: Any  # the model's transformers config (vocab_size)
    total_layers: int
    context_length: int
    table: Table
    reputation: Reputation  # failure accounting: bans, reports, the failover log and counts
    forwarder: Forwarder
    http: httpx.AsyncClient
    progress: Progress
    returns: Returns
    scheduler: Compute
    draft_block: Block | None
    speculation: SpeculationStats
    verification: VerificationStats
    stopping: bool

    def spawn(self, coro: Coroutine) -> asyncio.Task: ...

    async def run_step(self, req: StepRequest) -> StepResult: ...

    async def accept_step(self, req: StepRequest) -> None: ...

    async def run_shadow(
        self, req: StepRequest, shadow: Hop, mine: Commitment | None = None
    ) -> tuple[Commitment, ...]: ...

    async def close_sessions(self, session_id: str, hops: list[Hop]) -> None: ...

    async def judge(self, rows: list[list[int]], end: int) -> Commitment: ...

    def convict(
        self, peer_id: str, why: str, evidence: tuple[Commitment, Commitment] | None = None
    ) -> None: ...
