"""An entry peer over a fake swarm, in one process and without a model: each peer keeps its
sessions' tokens, the last "samples" a function of the whole sequence, and a test makes any peer
fail with any HopFailed reason: routing, failover and replay tested exactly, fast."""

import asyncio
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace

from peers.entry.speculative import SpeculationStats
from peers.swarm.commitments import VerificationStats
from peers.swarm.membership import SERVING, PeerRecord
from peers.swarm.reputation import Bans, Reputation
from peers.transport.errors import HopFailed
from peers.transport.frames import Hop, StepRequest
from peers.transport.results import StepResult

VOCAB = 64
LAYERS = 4


def next_token(sequence: list[int]) -> int:
    """The fake model: the next token of a sequence."""
    return (sum(sequence) * 7 + len(sequence)) % (VOCAB - 3) + 3


def reference(prompt: list[int], count: int) -> list[int]:
    """What greedy generation gives without any failure."""
    seq = list(prompt)
    for _ in range(count):
        seq.append(next_token(seq))
    return seq[len(prompt) :]


class FakeTable:
    """The part of membership's Table an entry reads."""

    def __init__(self, records: list[PeerRecord]):
        self.records = records
        self.me = PeerRecord("entry", "m", LAYERS, 0, 0, state=SERVING, address="entry:1")
        self.reported: list[str] = []

    def serving(self, model: str) -> list[PeerRecord]:
        return [r for r in self.records if r.model == model]

    def live(self) -> list[PeerRecord]:
        return list(self.records)

    def report_failure(self, peer_id: str) -> None:
        self.reported.append(peer_id)


class FakeSwarm:
    """Peers of the given spans; `fail[peer]`: the reason its next steps fail with (until
    removed); every step request is kept in `steps`, every closed session in `closed`."""

    def __init__(self, spans: dict[str, tuple[int, int]]):
        self.records = [
            PeerRecord(p, "m", LAYERS, s, e, state=SERVING, address=f"{p}:1") for p, (s, e) in spans.items()
        ]
        self.sessions: dict[tuple[str, str], list[list[int]]] = {}
        self.fail: dict[str, str] = {}
        self.steps: list[StepRequest] = []
        self.closed: list[tuple[str, tuple[str, ...]]] = []

    async def push(self, req: StepRequest) -> StepResult:
        self.steps.append(req)
        rows = req.tensor.tolist()  # [B, T]
        held: list[list[int]] = []
        for hop in req.hops:
            if hop.peer_id in self.fail:
                raise HopFailed(hop.peer_id, f"it said {self.fail[hop.peer_id]}", self.fail[hop.peer_id])
            held = self._extend(hop, req, rows)
        tokens = [next_token(h) for h in held]
        return StepResult(tokens=tokens, logprobs=[-0.5] * len(tokens))

    def _extend(self, hop: Hop, req: StepRequest, rows: list[list[int]]) -> list[list[int]]:
        key = (hop.peer_id, req.session_id)
        held = [[] for _ in rows] if req.position == 0 else self.sessions.get(key)
        if held is None or len(held[0]) != req.position:
            raise HopFailed(hop.peer_id, "it holds no such session", "session_lost")
        if len(held) == 1 and len(rows) > 1:  # the session widens to one sequence per row
            held = [list(held[0]) for _ in rows]
        held = [h + r for h, r in zip(held, rows, strict=True)]
        self.sessions[key] = held
        return held

    async def close(self, session_id: str, hops: list[Hop]) -> None:
        self.closed.append((session_id, tuple(h.peer_id for h in hops)))
        for hop in hops:
            self.sessions.pop((hop.peer_id, session_id), None)

    def first_hop(self) -> str:
        """The first peer of the latest step's route."""
        return self.steps[-1].hops[0].peer_id


class FakeCounter:
    def __init__(self):
        self.counts: dict[str, int] = {}

    def labels(self, reason: str) -> SimpleNamespace:
        return SimpleNamespace(inc=lambda: self.counts.__setitem__(reason, self.counts.get(reason, 0) + 1))


@dataclass
class FakeEntry:
    """An EntryPeer (peers/entry/peer.py) over a FakeSwarm; it is never on a route itself."""

    swarm: FakeSwarm
    failover_timeout_s: float = 5.0
    prefix_reuse: bool = False
    self_referee: bool = False
    peer_id: str = "entry"
    model_id: str = "m"
    total_layers: int = LAYERS
    context_length: int = 512
    draft_block: None = None
    failovers: int = 0
    stopping: bool = False
    failover_log: deque = field(default_factory=lambda: deque(maxlen=32))
    speculation: SpeculationStats = field(default_factory=SpeculationStats)
    verification: VerificationStats = field(default_factory=VerificationStats)
    convictions: list[tuple[str, str, object]] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)

    def __post_init__(self):
        self.config = SimpleNamespace(
            address="entry:1",
            direct_return=False,
            failover_timeout_s=self.failover_timeout_s,
            prefix_reuse=self.prefix_reuse,
            self_referee=self.self_referee,
            verify_rate=0.0,  # (an entry that checks some requests sends every step verified)
            swarm_key=None,
        )
        self.model_config = SimpleNamespace(vocab_size=VOCAB)
        self.table = FakeTable(self.swarm.records)
        self.bans = Bans(60, 600)
        self.forwarder = SimpleNamespace(push=self.swarm.push)
        self.metrics = SimpleNamespace(failovers=FakeCounter())
        self.reputation = Reputation(self.bans, self.table, self.failover_log, self._count)

    def _count(self, reason: str) -> None:
        self.failovers += 1
        self.metrics.failovers.labels(reason).inc()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task

    async def close_sessions(self, session_id: str, hops: list[Hop]) -> None:
        await self.swarm.close(session_id, hops)

    def convict(self, peer_id: str, why: str, evidence=None) -> None:
        self.convictions.append((peer_id, why, evidence))
        self.bans.convict(peer_id, 600)
