"""A peer: its block of layers and its life in the swarm (join, load, serve, move, leave). The
compute belongs to the scheduler, sending to other peers to the forwarder, and the gossip loop
to peers/swarm/gossip.py; this module wires them together and runs one hop of a step."""

import asyncio
import logging
import os
import random
import time
import uuid
from collections import deque
from dataclasses import replace
from functools import partial

import httpx
import torch

from inference import (
    Block,
    CacheFullError,
    RequestTooLarge,
    SessionError,
    Tokenizer,
    load_block,
    resolve_model,
)
from inference.block import load_config
from inference.core_turns import CoreTurns
from inference.prefix_cache import BLOCK_TOKENS
from inference.quant import weights_bytes
from inference.scheduler import Busy, Job, NonFinite, Sampled, Scheduler
from peers.config import CUDA_GRAPHS, NodeConfig
from peers.entry.speculative import SpeculationStats
from peers.metrics import Metrics
from peers.swarm.commitments import (
    MAX_REASON,
    TOLERANCE,
    Accusation,
    Accusations,
    Commitment,
    VerificationStats,
    check_commitments,
    input_rows,
    tensor_digest,
    top_entries,
    with_shadow,
)
from peers.swarm.gossip import Gossip
from peers.swarm.identity import Identity
from peers.swarm.links import Links, Speed
from peers.swarm.membership import (
    DEAD,
    JOINING,
    LEAVING,
    SERVING,
    PeerRecord,
    Table,
    new_incarnation,
)
from peers.swarm.reputation import Bans
from peers.timing import HopTimes
from peers.transport.auth import SwarmAuth
from peers.transport.direct import DONE, FAILED, QUEUED, Progress, Returns
from peers.transport.errors import HopFailed
from peers.transport.forwarder import Forwarder
from peers.transport.frames import Hop, StepRequest, StepResult, step_error_body, step_result_body
from peers.transport.limits import (
    post_capped,
)
from peers.transport.wire import accepted_encodings

log = logging.getLogger("layerswarm.peer")


STEPS_BODY_SLACK_BYTES = 4 << 20  # frame headers of a steps message, beyond its tensors
MAX_STEP_BATCH = 64  # sequences in one step (an OpenAI request asks for at most 16)
MAX_SESSION_ID = 128  # characters


class PeerNode:
    def __init__(self, config: NodeConfig, http: httpx.AsyncClient | None = None):
        """`http` carries every request to other peers; tests may pass one over an in-memory
        transport. By default a pooled keep-alive client."""
        self.config = config
        source = resolve_model(config.model)
        self.model_id, self.model_path = source.model_id, source.path
        self.model_config = load_config(source.path)
        self.total_layers = self.model_config.num_hidden_layers
        self.context_length = self.model_config.max_position_embeddings
        self.tokenizer = Tokenizer(source.path, config.chat_template)
        self.block: Block | None = None
        self.weights_bytes = 0  # of this peer's block as held in memory (inference/quant.py)
        self.draft_block: Block | None = None  # --draft-model, all its layers
        start, end = _initial_span(config.layers, self.total_layers)
        if config.identity_file:
            self.identity = Identity.load_or_create(config.identity_file)
        else:
            self.identity = Identity.generate()
        me = PeerRecord(
            "",
            self.model_id,
            self.total_layers,
            start,
            end,
            JOINING,
            new_incarnation(),
            0,
            0,
            address=config.address,
            wire=accepted_encodings(config.wire),
        )
        self.table = Table(me, self.identity, config.gossip)
        self.http = http or httpx.AsyncClient(
            auth=SwarmAuth(config.swarm_key) if config.swarm_key else None,
            timeout=config.hop_timeout_s,
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
        )
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
        )
        self.accusations = Accusations(
            self._public_key_of, self._avoid_accused, config.liar_ban_s, trusted=config.swarm_key is not None
        )
        self.gossip = Gossip(
            self.table,
            partial(post_capped, self.http),
            self.list_seeds(),
            self._housekeeping,
            self.accusations,
        )
        self.scheduler = Scheduler(lambda: self.block, config.scheduler)
        self.bans = Bans(config.ban_s, config.ban_max_s)
        self.active_requests = 0  # entry requests in flight here
        self.steps_served = 0  # hops this peer computed
        self.failovers = 0  # re-routes this entry made (a failed, busy or full peer, a lost session)
        self.failover_log: deque[dict] = deque(maxlen=32)  # the latest, for the swarm page
        self.verification = VerificationStats()
        self.speculation = SpeculationStats()
        self.metrics = Metrics()  # GET /metrics (what it reads when scraped: peers/app.py readings)
        self.scheduler.metrics = self.gossip.metrics = self.metrics
        self.progress = Progress()  # how far the steps that reached this hop got (direct return)
        self.returns = Returns()  # this entry's steps in flight (direct return)
        self.hop_times = HopTimes()  # where steps' wall time goes here
        self._verify_credit = 0.0
        self._referee_block: Block | None = None  # --self-referee's layers, loaded on a dispute
        self.stopping = False  # set when draining ends: requests still running end with an error
        self.on_fatal = None  # called with the exception when this peer cannot go on
        self._threads = 0
        self._turns: CoreTurns | None = None
        self._learning: asyncio.Future | None = None  # a gossip round to learn an unknown next hop
        self._learned_at = 0.0
        self._serving_since: float | None = None  # loop time this span started serving
        self._moving = False
        self._tasks: set[asyncio.Task] = set()  # background work, e.g. closing sessions
        self._gossip_task: asyncio.Task | None = None

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
        self._apply_threads()
        self._gossip_task = self.spawn(self.gossip.loop())
        if self.config.join:
            await self.gossip.round(self.list_seeds())
        if self.config.draft_model:
            self.draft_block = await self.scheduler.run_in_compute(self._load_draft_model)
        if self.config.layers is None:
            await self._choose_layers()
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
        self._serving_since = asyncio.get_running_loop().time()
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

    async def _maybe_rebalance(self) -> None:
        """An automatically placed peer whose layers others also serve moves to fill a gap; if
        the new layers cannot be loaded it goes back to the old ones, and if that fails too the
        peer stops (on_fatal) rather than stay `joining` for ever."""
        from peers.swarm.placement import rebalance_target

        settle_s = 3 * self.config.gossip.dead_after_s  # let views agree before acting on them
        if self._moving or not self.ready or self.config.layers is not None or not self.config.rebalance:
            return
        if asyncio.get_running_loop().time() - (self._serving_since or 0) < settle_s:
            return
        target = rebalance_target(self.table, self.model_id, self.total_layers)
        if target is None:
            return
        self._moving = True
        old = (self.table.me.start, self.table.me.end)
        try:
            log.info("moving from layers %d:%d to %d:%d to fill a gap", *old, *target)
            self.block = None  # steps in flight on the old layers fail over
            self.table.update_me(state=JOINING, start=target[0], end=target[1])
            await self.gossip.round([], fanout_all=True)
            try:
                await self._load_and_serve()
            except Exception:
                log.exception("loading layers %d:%d failed; going back to %d:%d", *target, *old)
                self.table.update_me(state=JOINING, start=old[0], end=old[1])
                try:
                    await self._load_and_serve()
                except Exception as e:
                    log.exception("reloading layers %d:%d failed too; this peer stops", *old)
                    if self.on_fatal is not None:
                        self.on_fatal(e)
                    raise
        finally:
            self._moving = False

    async def _choose_layers(self, rounds: int = 5) -> None:
        """Pick the span that most needs serving; announce it while joining, and move if a peer
        that chose first claimed the same layers (simultaneous newcomers settle in a few rounds)."""
        from peers.swarm.placement import choose_span

        interval = self.config.gossip.interval_s
        budget = self._layer_budget()
        await asyncio.sleep(interval * random.uniform(1.0, 2.0))  # learn the swarm first
        for _ in range(rounds):
            span = choose_span(self.table, self.model_id, self.total_layers, budget)
            if span == (self.table.me.start, self.table.me.end):
                return
            log.info("choosing layers %d:%d", *span)
            self.table.update_me(start=span[0], end=span[1])
            await self.gossip.round([], fanout_all=True)
            await asyncio.sleep(2 * interval)

    def _layer_budget(self) -> int:
        if self.config.num_layers is not None:
            return min(self.config.num_layers, self.total_layers)
        from peers.swarm.placement import layers_fitting_memory

        c = self.config
        return layers_fitting_memory(self.model_path, self.model_config, c.device, c.dtype, c.quant)

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
        if draft_config.vocab_size != self.model_config.vocab_size or Tokenizer(source.path).encode(
            probe
        ) != self.tokenizer.encode(probe):
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
        if not self._moving:
            self.spawn(self._maybe_rebalance())
        self._apply_threads()

    def _apply_threads(self) -> None:
        """Torch threads of the compute thread: --threads, else OMP_NUM_THREADS, else every core.
        Co-located peers compute in turns (--core-turns, and waves: see batch_wait_s) and their
        idle OpenMP threads sleep after a moment (--omp-wait-policy brief), so each may use all
        cores (measured in the README, "CPU threads": 2 threads per peer beat 1 on 2 cores with
        three peers)."""
        colocated = self._colocated_peers()
        self.scheduler.colocated = colocated > 1
        if not self._threads:
            env = os.environ.get("OMP_NUM_THREADS", "")
            self._threads = self.config.threads or (int(env) if env.isdigit() and int(env) > 0 else 0)
            self._threads = self._threads or os.cpu_count() or 1
            # OpenMP's thread count belongs to the thread that sets it: set it where forwards run.
            self.spawn(self.scheduler.run_in_compute(torch.set_num_threads, self._threads))
        self._apply_turns(colocated)

    def _apply_turns(self, colocated: int) -> None:
        """--core-turns: forwards take turns with the co-located peers' (see CoreTurns); auto
        while this CPU peer shares the machine and the peers' threads outnumber its cores."""
        mode = self.config.core_turns
        cpu = torch.device(self.config.device or "cpu").type == "cpu"
        on = mode == "on" or (
            mode == "auto" and cpu and colocated > 1 and colocated * self._threads > (os.cpu_count() or 1)
        )
        if on and self._turns is None:
            self._turns = CoreTurns()
        self.scheduler.turns = self._turns if on else None

    @property
    def max_steps_body_bytes(self) -> int:
        """The largest steps message a peer may receive: float32 hidden states of a whole
        context (a prompt travels as one frame), plus room for the frames' headers."""
        hidden = self.model_config.hidden_size
        return self.context_length * hidden * 4 + STEPS_BODY_SLACK_BYTES

    @property
    def threads(self) -> int:
        return self._threads

    def _colocated_peers(self) -> int:
        host = self.config.address.rsplit(":", 1)[0]
        return max(1, sum(1 for e in self.table.live() if e.address.rsplit(":", 1)[0] == host))

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
        if self._turns is not None:
            self._turns.close()
        await self.http.aclose()

    def list_seeds(self) -> list[str]:
        return [s for s in self.config.join if s != self.config.address]

    # -- steps -----------------------------------------------------------------------------
    async def run_step(self, req: StepRequest) -> StepResult:
        """Run this peer's hop of the step, then the rest of the route; HopFailed names who failed."""
        hop, block = await self._admit(req)
        out, job = await self._compute(req, hop, block)
        self.steps_served += 1
        if isinstance(out, StepResult):
            if req.verify:
                out = replace(out, top=None, commitments=(self._commit(req, hop, block, out.top, None),))
            return replace(out, tokens=[], logprobs=[]) if req.terminal else out
        mine = self._commit(req, hop, block, top_entries(out[:, -1]), out) if req.verify else None
        if req.terminal:  # a shadow: its commitment is its answer
            return StepResult([], [], commitments=(mine,))
        position = req.position + job.skipped  # the positions restored from the prefix cache stay behind
        nxt = replace(req, hops=req.hops[1:], tensor=out, position=position)
        shadow = self._shadow_of(req.hops[1], req.shadows) if req.verify else None
        if shadow is None:
            result = await self.forwarder.push(nxt)
        else:  # the same input to a replica of the next hop, which only answers its commitment
            result, seen = await with_shadow(self.forwarder.push(nxt), self.run_shadow(nxt, shadow, mine))
            result = replace(result, shadows=(*result.shadows, *seen))
        if mine is None:
            return result
        problem = check_commitments(self.table, req.hops[1:], result.commitments, nxt, only=1, mine=mine)
        if problem:  # what the next hop answered does not say who computed what: it is at fault
            raise HopFailed(req.hops[1].peer_id, problem[1])
        return replace(result, commitments=(mine, *result.commitments))

    async def accept_step(self, req: StepRequest) -> None:
        """Direct return: check the step (HopFailed if this peer refuses it), then compute it and
        hand it on in the background, while the sender goes on; the result, or the failure
        and who is at fault, goes straight to the entry (peers/transport/direct.py)."""
        entry = req.reply_to
        if not self._knows_entry(entry) and not await self._learn(lambda: self._knows_entry(entry)):
            raise HopFailed(
                self.peer_id, f"the step's entry {entry.peer_id} is not a live peer of its table", "busy"
            )
        t0 = time.perf_counter()
        hop, block = await self._admit(req)
        self.hop_times.add("check", time.perf_counter() - t0)
        self.progress.mark(req.step_id, QUEUED)
        self.spawn(self._carry(req, hop, block))

    async def _carry(self, req: StepRequest, hop: Hop, block: Block) -> None:
        try:
            out, job = await self._compute(req, hop, block)
            self.steps_served += 1
            t0 = time.perf_counter()
            if isinstance(out, StepResult):
                self._reply(req, replace(out, top=None))
            else:
                position = req.position + job.skipped
                await self.forwarder.push(replace(req, hops=req.hops[1:], tensor=out, position=position))
            self.hop_times.add("hand_on", time.perf_counter() - t0)
            self.progress.mark(req.step_id, DONE)
        except Exception as e:  # (HopFailed names who failed; anything else is a bug here)
            if not isinstance(e, HopFailed):
                log.exception("step failed here")
                e = HopFailed(self.peer_id, f"{type(e).__name__}: {e}")
            self.progress.mark(req.step_id, FAILED)
            self._reply(req, e)

    def _reply(self, req: StepRequest, outcome: StepResult | HopFailed) -> None:
        """Send a step's result or failure to its entry (this peer itself, or by HTTP)."""
        if req.reply_to.peer_id == self.peer_id:
            self.returns.deliver(self.peer_id, req.step_id, outcome)
        elif isinstance(outcome, HopFailed):
            body = step_error_body(outcome.message, outcome.peer_id, outcome.reason)
            self.forwarder.send_result(req.reply_to.address, req.step_id, body)
        else:
            self.forwarder.send_result(req.reply_to.address, req.step_id, step_result_body(outcome))

    def _knows_entry(self, entry) -> bool:
        if entry.peer_id == self.peer_id:
            return entry.address == self.config.address
        known = self.table.get(entry.peer_id)
        return (
            known is not None
            and known.address == entry.address
            and self.table.status(entry.peer_id) not in (None, DEAD)
        )

    async def _admit(self, req: StepRequest) -> tuple[Hop, Block]:
        """This peer's hop of the step and the block to run it, or HopFailed: the checks made
        before any work (the receiver bounds its own work, whatever the sender asks)."""
        hop = req.hops[0]
        block = self.block
        log.log(  # with the request's id (peers/transport/logs.py): a session's first step at info, the rest at debug
            logging.INFO if req.position == 0 else logging.DEBUG,
            "step of session %s: positions %d-%d of %d sequence(s), layers %d:%d",
            req.session_id[:12],
            req.position,
            req.position + req.tensor.shape[1] - 1,
            req.tensor.shape[0],
            hop.start,
            hop.end,
        )
        if block is None or hop.peer_id != self.peer_id:
            raise HopFailed(
                self.peer_id, f"this peer cannot run hop {hop.start}:{hop.end} for {hop.peer_id}", "busy"
            )
        if not block.span.start <= hop.start < hop.end <= block.span.end:
            raise HopFailed(
                self.peer_id, f"layers {hop.start}:{hop.end} are not inside its span {block.span}"
            )
        bad = _route_problem(req.hops, self.total_layers, req.terminal) or self._frame_problem(req)
        if bad:
            raise HopFailed(self.peer_id, bad, "bad_request")
        if (
            len(req.hops) > 1
            and not self._knows(req.hops[1])
            and not await self._learn(lambda: self._knows(req.hops[1]))
        ):
            raise HopFailed(
                self.peer_id,
                f"its next hop {req.hops[1].peer_id} ({req.hops[1].start}:{req.hops[1].end}) is not a "
                "serving peer of its table",
                "busy",  # tables may lag a moment: the entry routes around, nobody is banned
            )
        if req.tensor.is_floating_point() and not bool(torch.isfinite(req.tensor).all()):
            raise HopFailed(self.peer_id, "the hidden states it was sent are not finite", "bad_input")
        return hop, block

    async def _compute(
        self, req: StepRequest, hop: Hop, block: Block
    ) -> tuple[torch.Tensor | StepResult, Job]:
        """Run the hop on the scheduler: hidden states to hand on, or (the model's last layers)
        the sampled tokens; the errors of the compute mapped to HopFailed reasons."""
        last = hop.end == self.total_layers
        job = Job(
            req.session_id,
            req.tensor,
            req.position,
            (hop.start, hop.end),
            req.sampling if last else None,
            req.prefix,
            block=block,
            commit=bool(req.verify),
            draft=req.draft,
            controls=req.controls if last else (),
        )
        try:
            out = await self.scheduler.run(job)
        except Busy as e:
            raise HopFailed(self.peer_id, str(e), "busy") from None
        except SessionError as e:
            raise HopFailed(self.peer_id, str(e), "session_lost") from None
        except RequestTooLarge as e:
            raise HopFailed(self.peer_id, str(e), "too_large") from None
        except CacheFullError as e:
            raise HopFailed(self.peer_id, str(e), "cache_full") from None
        except NonFinite as e:
            raise HopFailed(self.peer_id, str(e)) from None
        except ValueError as e:  # the sender's step does not fit these layers
            raise HopFailed(self.peer_id, str(e), "bad_request") from None
        except Exception as e:  # a bug, a torch or CUDA error: this hop failed, the entry fails over
            log.warning("step failed here: %s: %s", type(e).__name__, e)
            raise HopFailed(self.peer_id, f"{type(e).__name__}: {e}") from e
        if job.started is not None:
            self.hop_times.add("queue", job.started - job.enqueued)
        self.hop_times.add("compute", job.compute_s)
        if isinstance(out, Sampled):
            out = StepResult(out.tokens, out.logprobs, top=out.top, alternatives=out.alternatives)
        return out, job

    def _shadow_of(self, hop: Hop, shadows: tuple[Hop, ...]) -> Hop | None:
        """The shadow of `hop` among a frame's, if this peer's table knows it serves those layers
        (no frame makes a peer send hidden states to an address of the sender's choosing)."""
        shadow = next((s for s in shadows if (s.start, s.end) == (hop.start, hop.end)), None)
        return shadow if shadow is not None and self._knows(shadow) else None

    async def run_shadow(
        self, req: StepRequest, shadow: Hop, mine: Commitment | None = None
    ) -> tuple[Commitment, ...]:
        """Send `req`'s input for its first hop to `shadow` too (a terminal frame): its checked
        commitment, or nothing if it failed (the entry then sees that hop unchecked). `mine`:
        this peer's commitment to what it sent, if it computed `req`'s input."""
        frame = replace(req, hops=[shadow], shadows=(), terminal=True)
        try:
            if shadow.peer_id == self.peer_id:
                result = await self.run_step(frame)
            else:
                result = await self.forwarder.push(frame)
        except HopFailed as e:
            log.info(
                "shadow %s of layers %d:%d failed: %s", shadow.peer_id, shadow.start, shadow.end, e.message
            )
            return ()
        problem = check_commitments(self.table, [shadow], result.commitments, req, mine=mine)
        if problem:  # (its input must be exactly what this peer sent its hop)
            log.info("shadow %s answered no valid commitment: %s", shadow.peer_id, problem[1])
            return ()
        return result.commitments

    def _commit(self, req: StepRequest, hop: Hop, block: Block, top, sent: torch.Tensor | None) -> Commitment:
        """This peer's signed commitment to its step: what it was sent, and the top entries of
        its output (and the digest of the output it sends on, if any)."""
        end = req.position + req.tensor.shape[1]
        # the looser of its compute dtype's and its quantization's tolerance (int8 weights
        # computing in bfloat16 differ as bfloat16 does)
        dtype = str(block.dtype).removeprefix("torch.")
        if block.quant != "none" and TOLERANCE[block.quant] > TOLERANCE.get(dtype, 0.0):
            dtype = block.quant
        in_idx, in_val = top_entries(input_rows(req.tensor))
        return Commitment(
            "",
            hop.start,
            hop.end,
            end,
            req.verify,
            dtype,
            tuple(map(tuple, top[0])),
            tuple(map(tuple, top[1])),
            input_digest=tensor_digest(req.tensor),
            output_digest=tensor_digest(sent) if sent is not None else "",
            input_top=tuple(map(tuple, in_idx)),
            input_values=tuple(map(tuple, in_val)),
        ).signed(self.identity)

    def _frame_problem(self, req: StepRequest) -> str | None:
        """What makes a frame one this peer refuses before any work (the receiver bounds its own
        work, whatever the sender asks)."""
        batch, steps = req.tensor.shape[:2]
        if batch > MAX_STEP_BATCH:
            return f"a step carries at most {MAX_STEP_BATCH} sequences, this one {batch}"
        if req.position + steps > self.context_length:
            return (
                f"positions {req.position}..{req.position + steps} pass the model's context of "
                f"{self.context_length}"
            )
        if not 0 < len(req.session_id) <= MAX_SESSION_ID or not req.session_id.isprintable():
            return f"a session id is 1 to {MAX_SESSION_ID} printable characters"
        if len(req.prefix) > self.context_length // BLOCK_TOKENS:
            return f"a prefix of {len(req.prefix)} blocks is longer than the model's context"
        return None

    def _knows(self, hop: Hop) -> bool:
        """Whether a next hop is a peer of this peer's own table, serving (or leaving: it still
        finishes its sessions) this model's layers of the hop: no frame sends hidden states to an
        address its sender made up."""
        if hop.peer_id == self.peer_id:
            return False  # a route visits each peer once (checked above); never a loop back here
        entry = self.table.get(hop.peer_id)
        return (
            entry is not None
            and entry.address == hop.address
            and self.table.status(hop.peer_id) not in (None, DEAD)
            and entry.model == self.model_id
            and entry.state in (SERVING, LEAVING)
            and entry.start <= hop.start < hop.end <= entry.end
        )

    async def _learn(self, knows) -> bool:
        """A peer this peer does not know yet (tables lag a moment after a peer joins): one extra
        gossip round with peers it already knows, shared by the steps that wait for it and at
        most one a second, then whether `knows()` now. An address that only the frame names is
        never dialled."""
        loop = asyncio.get_running_loop()
        if self._learning is None or (self._learning.done() and loop.time() - self._learned_at > 1.0):
            self._learned_at = loop.time()
            self._learning = asyncio.ensure_future(
                self.gossip.round(self.table.gossip_targets(self.list_seeds()))
            )
        await asyncio.shield(self._learning)
        return knows()

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
        """Whether this entry checks its next request: exactly verify_rate of them, evenly spread
        (one in 20 at 0.05), so that the cost is what the rate says."""
        self._verify_credit += self.config.verify_rate
        if self._verify_credit >= 1 - 1e-9:
            self._verify_credit -= 1
            return True
        return False

    def convict(self, peer_id: str, why: str, evidence: tuple[Commitment, Commitment] | None = None) -> None:
        """A peer computed wrong (outvoted by other replicas): avoid it for liar_ban_s, any life;
        with `evidence` (its commitment and a witness's, disagreeing), accuse it by gossip too."""
        self._avoid_accused(peer_id, self.config.liar_ban_s, why)
        if evidence is not None:
            until = time.time() + self.config.liar_ban_s
            self.accusations.add(
                Accusation(peer_id, "", until, why[:MAX_REASON], evidence).signed(self.identity)
            )

    def _avoid_accused(self, peer_id: str, seconds: float, why: str) -> None:
        self.bans.convict(peer_id, seconds)
        self.verification.convicted[peer_id] = why
        while len(self.verification.convicted) > 64:
            del self.verification.convicted[next(iter(self.verification.convicted))]
        entry = self.table.get(peer_id)
        address = entry.address if entry else "?"
        log.warning("peer %s (%s) convicted: %s; avoided for %.0f s", peer_id, address, why, seconds)

    def _wire_accepted(self, peer_id: str) -> tuple[str, ...]:
        """The encodings of hidden states a peer announced it accepts (none if unknown)."""
        entry = self.table.get(peer_id)
        return entry.wire if entry is not None else ()

    def _public_key_of(self, peer_id: str) -> str | None:
        entry = self.table.get(peer_id)
        return entry.public_key if entry is not None else None

    async def close_sessions(self, session_id: str, hops: list[Hop]) -> None:
        """Free the session on every peer of a route (best effort, bounded)."""
        if any(h.peer_id == self.peer_id for h in hops) and self.block is not None:
            self.block.close(session_id)
            self.scheduler.forget(session_id)
        await self.forwarder.close_remote(session_id, hops)


def _route_problem(hops: list[Hop], total: int, terminal: bool = False) -> str | None:
    """What is wrong with a route: hops must tile [first start, total) in order, each peer at
    most once; a shadow's frame (terminal) has one hop."""
    if terminal and len(hops) != 1:
        return "a shadow's frame has exactly one hop"
    for a, b in zip(hops, hops[1:], strict=False):
        if a.end != b.start:
            return f"the route skips or repeats layers: {a.start}:{a.end} is followed by {b.start}:{b.end}"
    if hops[-1].end != total and not terminal:
        return f"the route ends at layer {hops[-1].end}, not at the model's last layer {total}"
    if any(not 0 <= h.start < h.end for h in hops):
        return "a hop of the route has a bad layer range"
    if len({h.peer_id for h in hops}) != len(hops):
        return "the route visits a peer more than once"
    return None


def _initial_span(layers: str | None, total: int) -> tuple[int, int]:
    if layers is None:
        return 0, 0  # chosen once the swarm is known
    from inference import parse_span

    span = parse_span(layers, total)
    return span.start, span.end
