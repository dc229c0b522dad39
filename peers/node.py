"""A peer: its block of layers and its life in the swarm (join, load, serve, move, leave). The
compute belongs to the scheduler, this peer's hop of a step to peers/hop.py, where its layers go
to placement, sending to the forwarder and the gossip loop to gossip; this module wires them."""

import asyncio
import logging
import time
import uuid
from collections import deque
from functools import partial

import httpx
import torch

from inference import Block, Tokenizer, load_block, resolve_model
from inference.block import load_config
from inference.core_turns import ThreadPolicy, colocated_peers
from inference.quant import weights_bytes
from inference.scheduler import Scheduler
from peers.config import CUDA_GRAPHS, NodeConfig
from peers.cores import pin_cpus
from peers.entry.speculative import SpeculationStats
from peers.hop import HopRunner
from peers.metrics import Metrics
from peers.swarm.commitments import (
    MAX_REASON,
    Accusation,
    Accusations,
    Commitment,
    VerificationStats,
    top_entries,
)
from peers.swarm.gossip import Gossip
from peers.swarm.identity import Identity
from peers.swarm.links import Links, Speed
from peers.swarm.membership import DEAD, JOINING, LEAVING, SERVING, PeerRecord, Table, new_incarnation
from peers.swarm.placement import Placement, PlacementSettings, initial_span, layer_budget
from peers.swarm.reach import Reachability
from peers.swarm.reputation import Bans, Reputation
from peers.timing import HopTimes
from peers.transport.auth import SwarmAuth
from peers.transport.direct import Progress, Returns
from peers.transport.forwarder import Forwarder
from peers.transport.frames import Hop, StepRequest
from peers.transport.limits import MAX_REPLY_BYTES, fetch_capped, post_capped
from peers.transport.results import StepResult
from peers.transport.stream import Streams
from peers.transport.wire import accepted_encodings

log = logging.getLogger("layerswarm.peer")

STEPS_BODY_SLACK_BYTES = 4 << 20  # frame headers of a steps message, beyond its tensors


class PeerNode:
    def __init__(self, config: NodeConfig, http: httpx.AsyncClient | None = None):
        """`http` carries requests to other peers (tests: in-memory); by default a keep-alive pool."""
        self.config = config
        pin_cpus(config.cpus)  # --cpus (peer serve pinned the process before torch loaded already)
        source = resolve_model(config.model)
        self.model_id, self.model_path = source.model_id, source.path
        self.model_config = load_config(source.path)
        self.total_layers = self.model_config.num_hidden_layers
        self.context_length = self.model_config.max_position_embeddings
        self.tokenizer = Tokenizer(source.path, config.chat_template)
        self.block: Block | None = None
        self.weights_bytes = 0  # of this peer's block as held in memory (inference/quant.py)
        self.draft_block: Block | None = None  # --draft-model, all its layers
        self.identity = _identity(config.identity_file)
        self.table = Table(self._announced(), self.identity, config.gossip)
        self.http = http or _client(config)
        self.links = Links()  # round-trip times to other peers, published for latency-aware routes
        self.speed = Speed()  # this peer's compute time per layer, published likewise
        self.forwarder = Forwarder(
            self.identity.peer_id,
            self.http,
            config.hop_timeout_s,
            config.hop_timeout_per_token_s,
            self.links,
            config.wire,
            self._wire_accepted,
            self._streams(own_client=http is None),
        )
        self.bans = Bans(config.ban_s, config.ban_max_s)
        self.failovers = 0  # re-routes this entry made (a failed, busy or full peer, a lost session)
        self.failover_log: deque[dict] = deque(maxlen=32)  # the latest, for the swarm page
        self.verification = VerificationStats()
        self.reputation = Reputation(
            self.bans, self.table, self.failover_log, self._count_failover, verification=self.verification
        )
        self.accusations = Accusations(
            self._public_key_of,
            self.reputation.convict,
            config.liar_ban_s,
            trusted=config.swarm_key is not None,
        )
        self.metrics = Metrics()  # GET /metrics (what it reads when scraped: peers/app.py readings)
        post = partial(post_capped, self.http)
        self.gossip = Gossip(
            self.table, post, self.list_seeds(), self._housekeeping, self.accusations, self.metrics
        )
        self.reach = Reachability(self.table, partial(fetch_capped, self.http))  # (dial-back checks)
        self.scheduler = Scheduler(lambda: self.block, config.scheduler, metrics=self.metrics)
        self.cpu = ThreadPolicy(self.scheduler, config.threads, config.core_turns, config.device, config.cpus)
        self.active_requests, self.speculation = 0, SpeculationStats()  # (entry requests in flight here)
        self.progress = Progress()  # how far the steps that reached this hop got (direct return)
        self.returns = Returns()  # this entry's steps in flight (direct return)
        self.hop_times = HopTimes()  # where steps' wall time goes here
        self.hops = self._hop_runner()
        self.placement = self._placement()
        self._referee_block: Block | None = None  # --self-referee's layers, loaded on a dispute
        self.stopping = False  # set when draining ends: requests still running end with an error
        self.on_fatal = None  # called with the exception when this peer cannot go on
        self._tasks: set[asyncio.Task] = set()  # background work, e.g. closing sessions
        self._gossip_task: asyncio.Task | None = None

    def _count_failover(self, reason: str) -> None:
        """A re-route this entry made, by reason (one of HopFailed.REASONS)."""
        self.failovers += 1
        self.metrics.failovers.labels(reason).inc()

    def _announced(self) -> PeerRecord:
        """This peer's first entry of the table: joining, with --layers' span or none yet."""
        start, end = initial_span(self.config.layers, self.total_layers)
        fields = (self.model_id, self.total_layers, start, end, JOINING, new_incarnation(), 0, 0)
        return PeerRecord("", *fields, address=self.config.address, wire=accepted_encodings(self.config.wire))

    def _hop_runner(self) -> HopRunner:
        return HopRunner(
            identity=self.identity,
            table=self.table,
            context_length=self.context_length,
            scheduler=self.scheduler,
            block=lambda: self.block,
            forwarder=self.forwarder,
            returns=self.returns,
            progress=self.progress,
            hop_times=self.hop_times,
            spawn=self.spawn,
            gossip_round=lambda: self.gossip.round(self.table.gossip_targets(self.list_seeds())),
        )

    def _placement(self) -> Placement:
        c, views = self.config, self.config.gossip
        # (a move waits 3 times dead_after_s: views agree before it acts on them)
        settings = PlacementSettings(c.layers is None, c.rebalance, views.interval_s, 3 * views.dead_after_s)
        budget = partial(
            layer_budget, c.num_layers, self.model_path, self.model_config, c.device, c.dtype, c.quant
        )
        announce = partial(self.gossip.round, [], fanout_all=True)
        return Placement(
            self.table, settings, budget, announce, self._load_and_serve, self._unload, self._fatal
        )

    @property
    def peer_id(self) -> str:
        return self.table.me.peer_id

    @property
    def ready(self) -> bool:
        return self.block is not None and self.table.me.state == SERVING

    @property
    def served_names(self) -> tuple[str, ...]:
        """The model names the OpenAI API answers to (--served-model-name); the swarm itself
        knows the model by `model_id`."""
        return self.config.served_model_names or (self.model_id,)

    @property
    def served_model(self) -> str:
        """The name the OpenAI API reports: the first served name."""
        return self.served_names[0]

    @property
    def steps_served(self) -> int:
        """Hops this peer computed."""
        return self.hops.steps_served

    @property
    def threads(self) -> int:
        return self.cpu.threads

    @property
    def cpus(self) -> tuple[int, ...]:
        """The cores this peer's forwards run on (--cpus, else every core it may use)."""
        return self.cpu.cores

    @property
    def max_steps_body_bytes(self) -> int:
        """The largest steps message a peer may receive: float32 hidden states of a whole
        context (a prompt travels as one frame), plus room for the frames' headers."""
        hidden = self.model_config.hidden_size
        return self.context_length * hidden * 4 + STEPS_BODY_SLACK_BYTES

    def spawn(self, coro) -> asyncio.Task:
        """Run `coro` in the background; its exception, if any, is logged, never dropped."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # -- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Join the swarm, load this peer's block, then serve."""
        self.scheduler.start()
        self.spawn(self.cpu.set_threads())
        self._fit_cores()
        self._gossip_task = self.spawn(self.gossip.loop())
        if self.config.join:
            await self.gossip.round(self.list_seeds())
        if self.config.draft_model:
            self.draft_block = await self.scheduler.run_in_compute(self._load_draft_model)
        if self.config.layers is None:
            await self.placement.choose()
        await self._load_and_serve()

    async def _load_and_serve(self) -> None:
        me = self.table.me
        log.info("loading layers %d:%d of %s", me.start, me.end, self.model_id)
        started = time.monotonic()
        self.block = await self.scheduler.run_in_compute(self._load_block, me.start, me.end)
        self.weights_bytes = weights_bytes(self.block)
        log.info(
            "loaded %.1f MB of weights%s in %.1f s",
            self.weights_bytes / 1e6,
            "" if self.config.quant == "none" else f" ({self.config.quant})",
            time.monotonic() - started,
        )
        self.table.update_me(state=SERVING)
        self.placement.serving()
        log.info(
            "serving layers %d:%d of %s as peer %s: OpenAI API at http://%s/v1, swarm page at http://%s/",
            me.start,
            me.end,
            self.model_id,
            self.peer_id,
            me.address,
            me.address,
        )
        await self.gossip.round(self.table.gossip_targets(self.list_seeds()))

    def _unload(self) -> None:
        self.block = None  # steps in flight on the old layers fail over

    def _fatal(self, error: Exception) -> None:
        if self.on_fatal is not None:
            self.on_fatal(error)

    def _load_block(self, start: int, end: int) -> Block:
        c = self.config
        prefix_tokens = c.prefix_cache_tokens if c.prefix_reuse else 0
        return load_block(
            self.model_path,
            (start, end),
            c.device,
            c.dtype,
            c.max_cache_tokens,
            c.session_idle_s,
            prefix_tokens,
            cuda_graphs=CUDA_GRAPHS[c.cuda_graphs],
            quant=c.quant,
        )

    def _load_draft_model(self) -> Block:
        """--draft-model: the whole of a small model sharing the served model's tokenizer."""
        name = self.config.draft_model
        source = resolve_model(name)
        draft_config = load_config(source.path)
        probe = "The quick brown fox, 1234 times!\n\tdef f(x): return x"
        same_vocab = draft_config.vocab_size == self.model_config.vocab_size
        if not same_vocab or Tokenizer(source.path).encode(probe) != self.tokenizer.encode(probe):
            raise ValueError(
                f"--draft-model {name}: its tokenizer differs from that of {self.model_id}; a draft "
                "model must share the served model's tokenizer"
            )
        log.info("loading the draft model %s", source.model_id)
        c = self.config
        return load_block(
            source.path,
            None,
            c.device,
            c.dtype,
            c.max_cache_tokens,
            c.session_idle_s,
            cuda_graphs=CUDA_GRAPHS[c.cuda_graphs],
        )

    def _housekeeping(self) -> None:
        """Before each gossip round: expire idle sessions, publish load, maybe move, fit threads."""
        if self.block is not None:
            self.block.sessions.expire()  # sessions of vanished entries; also when no step comes
        stats, me = self.scheduler.stats, self.table.me
        self.table.beat(
            load=self.block.open_sessions() if self.block else 0,
            layer_ms=self.speed.update(stats.decode_compute_s, stats.decode_batches, me.end - me.start),
            links=self.links.published(),
        )
        if not self.placement.moving:
            self.spawn(self.placement.rebalance())
        if self.block is not None and self.reach.due():
            self.spawn(self.reach.check())
        self._fit_cores()

    def _fit_cores(self) -> None:
        """Whether forwards take turns with the peers sharing this machine (inference/core_turns.py)."""
        self.cpu.fit(colocated_peers(self.config.address, (e.address for e in self.table.live())))

    async def announce_leaving(self) -> None:
        """Tell the swarm this peer is leaving: new sessions avoid it from now on."""
        if self.table.me.state in (LEAVING, DEAD):
            return
        self.table.update_me(state=LEAVING)
        await self.gossip.round([], fanout_all=True)

    async def leave(self) -> None:
        """Announce leaving, let in-flight requests finish (bounded by drain_s); requests still
        running then end with an error (their streams get an error event and [DONE]) and close
        their sessions; then announce departure."""
        if self.table.me.state == DEAD:
            return
        await self.announce_leaving()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_s
        while self._busy() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.stopping = True
        deadline = loop.time() + 2.0
        while self.active_requests and loop.time() < deadline:
            await asyncio.sleep(0.05)
        closing = [t for t in self._tasks if t is not self._gossip_task]  # e.g. closing sessions
        if closing:
            await asyncio.wait(closing, timeout=2.0)
        self.table.update_me(state=DEAD)
        await self.gossip.round([], fanout_all=True)

    def _busy(self) -> bool:
        return bool(self.active_requests or (self.block is not None and self.block.open_sessions()))

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.scheduler.close()
        self.cpu.close()
        if self.forwarder.streams is not None:
            await self.forwarder.streams.close()
        await self.http.aclose()

    def _streams(self, own_client: bool) -> Streams | None:
        """The lean hop's streams (off with --no-hop-stream; none for a client given: in-memory, HTTP only)."""
        return (
            Streams(self.config.swarm_key, MAX_REPLY_BYTES) if self.config.hop_stream and own_client else None
        )

    def list_seeds(self) -> list[str]:
        return [s for s in self.config.join if s != self.config.address]

    # -- steps (this peer's hop: peers/hop.py) ---------------------------------------------
    async def run_step(self, req: StepRequest) -> StepResult:
        """Run this peer's hop of the step, then the rest of the route; HopFailed names who failed."""
        return await self.hops.run_step(req)

    async def accept_step(self, req: StepRequest) -> None:
        """Direct return: check the step, then compute it and hand it on in the background."""
        await self.hops.accept_step(req)

    async def run_shadow(
        self, req: StepRequest, shadow: Hop, mine: Commitment | None = None
    ) -> tuple[Commitment, ...]:
        """Send `req`'s input for its first hop to `shadow` too: its checked commitment, or nothing."""
        return await self.hops.run_shadow(req, shadow, mine)

    async def close_sessions(self, session_id: str, hops: list[Hop]) -> None:
        """Free the session on every peer of a route (best effort, bounded)."""
        if any(h.peer_id == self.peer_id for h in hops) and self.block is not None:
            self.block.close(session_id)
            self.scheduler.forget(session_id)
        await self.forwarder.close_remote(session_id, hops)

    # -- verification (the entry's side: peers/entry/consensus.py) ---------------------------
    async def judge(self, rows: list[list[int]], end: int) -> Commitment:
        """--self-referee: this entry recomputes layers 0:end itself on token sequences `rows`
        (it loads those layers once, apart from its own block) and commits to the last
        positions' output, as a hop would."""

        def compute():
            block = self._referee_block
            if block is None or block.span.end != end:
                self._referee_block = None  # one at a time
                c = self.config
                block = load_block(self.model_path, (0, end), c.device, c.dtype, self.context_length, 60.0)
                self._referee_block = block
            outs = []
            for row in rows:
                session = f"referee-{uuid.uuid4().hex}"
                try:
                    outs.append(block.forward(session, torch.tensor([row]), 0)[:, -1])
                finally:
                    block.close(session)
            return torch.cat(outs), str(block.dtype).removeprefix("torch.")

        x, dtype = await self.scheduler.run_in_compute(compute)
        idx, val = top_entries(x, logits=end == self.total_layers)
        return Commitment(self.peer_id, 0, end, 0, "", dtype, tuple(map(tuple, idx)), tuple(map(tuple, val)))

    def should_verify(self) -> bool:
        """Whether this entry checks its requests (--verify-rate > 0): each of them then runs
        checked, each replicated hop of its route shadowed with chance verify_rate, drawn for
        each hop on its own when the route opens (peers/entry/routes.py shadows_for)."""
        return self.config.verify_rate > 0

    def convict(self, peer_id: str, why: str, evidence: tuple[Commitment, Commitment] | None = None) -> None:
        """A peer computed wrong (outvoted by other replicas): avoid it for liar_ban_s, any life;
        with `evidence` (its commitment and a witness's, disagreeing), accuse it by gossip too."""
        self.reputation.convict(peer_id, self.config.liar_ban_s, why)
        if evidence is not None:
            until = time.time() + self.config.liar_ban_s
            self.accusations.add(
                Accusation(peer_id, "", until, why[:MAX_REASON], evidence).signed(self.identity)
            )

    def _wire_accepted(self, peer_id: str) -> tuple[str, ...]:
        """The encodings of hidden states a peer announced it accepts (none if unknown)."""
        entry = self.table.get(peer_id)
        return entry.wire if entry is not None else ()

    def _public_key_of(self, peer_id: str) -> str | None:
        entry = self.table.get(peer_id)
        return entry.public_key if entry is not None else None


def _client(config: NodeConfig) -> httpx.AsyncClient:
    """A pooled keep-alive client for requests to other peers (signed in a private swarm)."""
    return httpx.AsyncClient(
        auth=SwarmAuth(config.swarm_key) if config.swarm_key else None,
        timeout=config.hop_timeout_s,
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
    )


def _identity(identity_file: str | None) -> Identity:
    """--identity-file's identity (made and kept there the first time), else a new one."""
    return Identity.load_or_create(identity_file) if identity_file else Identity.generate()
