"""A peer: its block of layers, its view of the swarm, and the step that runs its hop of a route
and pushes the hidden states on to the next peer."""

import asyncio
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import httpx
import torch

from inference import (
    Block,
    CacheFullError,
    SamplingParams,
    SessionError,
    Tokenizer,
    load_block,
    resolve_model,
    sample,
)
from inference.block import load_config

from .errors import HopFailed
from .membership import DEAD, JOINING, LEAVING, SERVING, GossipSettings, PeerEntry, Table, new_incarnation
from .protocol import (
    PATH_CLOSE,
    PATH_GOSSIP,
    PATH_STEP,
    STEP_CONTENT_TYPE,
    Hop,
    ProtocolError,
    StepRequest,
    StepResult,
    encode_step,
)

log = logging.getLogger("layerswarm.peer")


@dataclass(frozen=True)
class NodeConfig:
    model: str = "smollm2-135m"
    layers: str | None = None  # "A:B"; None chooses automatically
    num_layers: int | None = None  # with layers None: how many to serve
    host: str = "127.0.0.1"
    port: int = 7001
    public_address: str | None = None  # what others dial; host:port by default
    join: tuple[str, ...] = ()
    device: str | None = None
    dtype: str | None = None
    max_cache_tokens: int = 65536
    session_idle_s: float = 120.0
    hop_timeout_s: float = 30.0  # one hop of a step; a chain call allows this per remaining hop
    failover_timeout_s: float = 60.0  # how long an entry keeps trying to re-route one request
    ban_s: float = 5.0  # first ban of a failed peer; doubles on each repeat, up to ban_max_s
    ban_max_s: float = 120.0
    drain_s: float = 10.0  # on leave: how long in-flight requests may finish
    rebalance: bool = True  # with layers None: move to fill a gap when this peer's span is redundant
    max_queue: int = 256  # requests an entry holds at once; more get 503
    gossip: GossipSettings = field(default_factory=GossipSettings)

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        for name in ("hop_timeout_s", "failover_timeout_s", "ban_s", "session_idle_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")

    @property
    def address(self) -> str:
        return self.public_address or f"{self.host}:{self.port}"


class PeerNode:
    def __init__(self, config: NodeConfig):
        self.config = config
        source = resolve_model(config.model)
        self.model_id, self.model_path = source.model_id, source.path
        self.model_config = load_config(source.path)
        self.total_layers = self.model_config.num_hidden_layers
        self.context_length = self.model_config.max_position_embeddings
        self.tokenizer = Tokenizer(source.path)
        self.block: Block | None = None
        start, end = _initial_span(config.layers, self.total_layers)
        me = PeerEntry(
            config.address, self.model_id, self.total_layers, start, end, JOINING, new_incarnation(), 0, 0
        )
        self.table = Table(me, config.gossip)
        self.http = httpx.AsyncClient(
            timeout=config.hop_timeout_s,
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
        )
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block")
        self._tasks: list[asyncio.Task] = []
        self.active_requests = 0  # entry requests in flight here
        self.steps_served = 0  # hops this peer computed
        self.steps_in_flight = 0  # hops waiting for or using the compute thread
        self._serving_since: float | None = None  # loop time this span started serving
        self._moving = False
        self.background: set[asyncio.Task] = set()  # fire-and-forget work, e.g. closing sessions
        from .entry import Bans

        self.bans = Bans(config.ban_s, config.ban_max_s)

    @property
    def peer_id(self) -> str:
        return self.table.me.peer_id

    @property
    def ready(self) -> bool:
        return self.block is not None and self.table.me.state == SERVING

    # -- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Join the swarm, load this peer's block, then serve."""
        self._tasks.append(asyncio.create_task(self._gossip_loop()))
        if self.config.join:
            await self.gossip_round(self.list_seeds())
        if self.config.layers is None:
            await self._choose_layers()
        await self._load_and_serve()

    async def _load_and_serve(self) -> None:
        me = self.table.me
        log.info("loading layers %d:%d of %s", me.start, me.end, self.model_id)
        loop = asyncio.get_running_loop()
        self.block = await loop.run_in_executor(self._compute, self._load_block, me.start, me.end)
        self.table.update_me(state=SERVING)
        self._serving_since = loop.time()
        log.info("serving layers %d:%d of %s at %s", me.start, me.end, self.model_id, self.peer_id)
        await self.gossip_round(self.table.gossip_targets(self.list_seeds()))

    async def _maybe_rebalance(self) -> None:
        """An automatically placed peer whose layers others also serve moves to fill a gap."""
        from .layer_choice import rebalance_target

        settle_s = 3 * self.config.gossip.dead_after_s  # let views agree before acting on them
        if self._moving or not self.ready or self.config.layers is not None or not self.config.rebalance:
            return
        if asyncio.get_running_loop().time() - (self._serving_since or 0) < settle_s:
            return
        target = rebalance_target(self.table, self.model_id, self.total_layers)
        if target is None:
            return
        self._moving = True
        try:
            log.info(
                "moving from layers %d:%d to %d:%d to fill a gap",
                self.table.me.start,
                self.table.me.end,
                *target,
            )
            self.block = None  # steps in flight on the old layers fail over
            self.table.update_me(state=JOINING, start=target[0], end=target[1])
            await self.gossip_round([], fanout_all=True)
            await self._load_and_serve()
        finally:
            self._moving = False

    async def _choose_layers(self, rounds: int = 5) -> None:
        """Pick the span that most needs serving; announce it while joining, and move if a peer
        that chose first claimed the same layers (simultaneous newcomers settle in a few rounds)."""
        from .layer_choice import choose_span

        interval = self.config.gossip.interval_s
        budget = self._layer_budget()
        await asyncio.sleep(interval * random.uniform(1.0, 2.0))  # learn the swarm first
        for _ in range(rounds):
            span = choose_span(self.table, self.model_id, self.total_layers, budget)
            if span == (self.table.me.start, self.table.me.end):
                return
            log.info("choosing layers %d:%d", *span)
            self.table.update_me(start=span[0], end=span[1])
            await self.gossip_round([], fanout_all=True)
            await asyncio.sleep(2 * interval)

    def _layer_budget(self) -> int:
        if self.config.num_layers is not None:
            return min(self.config.num_layers, self.total_layers)
        from .layer_choice import layers_fitting_memory

        return layers_fitting_memory(self.model_path, self.model_config, self.config.device)

    def _load_block(self, start: int, end: int) -> Block:
        c = self.config
        return load_block(
            self.model_path, (start, end), c.device, c.dtype, c.max_cache_tokens, c.session_idle_s
        )

    async def announce_leaving(self) -> None:
        """Tell the swarm this peer is leaving: new sessions avoid it from now on."""
        if self.table.me.state in (LEAVING, DEAD):
            return
        self.table.update_me(state=LEAVING)
        await self.gossip_round([], fanout_all=True)

    async def leave(self) -> None:
        """Announce leaving, let in-flight requests finish (bounded), then announce departure."""
        if self.table.me.state == DEAD:
            return
        await self.announce_leaving()
        deadline = asyncio.get_running_loop().time() + self.config.drain_s
        while self._busy() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self.table.update_me(state=DEAD)
        await self.gossip_round([], fanout_all=True)

    def _busy(self) -> bool:
        return bool(self.active_requests or (self.block is not None and self.block.open_sessions()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.aclose()
        self._compute.shutdown(wait=False, cancel_futures=True)

    def list_seeds(self) -> list[str]:
        return [s for s in self.config.join if s != self.peer_id]

    # -- gossip ----------------------------------------------------------------------------
    async def _gossip_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pause = self.config.gossip.interval_s * random.uniform(0.8, 1.2)
            before = loop.time()
            await asyncio.sleep(pause)
            if loop.time() - before - pause > self.config.gossip.suspect_after_s:
                # This process was frozen or starved: its silence view is stale, not the others'.
                log.warning("gossip stalled for %.1f s; refreshing the view", loop.time() - before)
                self.table.forgive()
            try:
                if self.block is not None:
                    self.block.sessions.expire()  # sessions of vanished entries; also when no step comes
                self.table.beat(load=self.block.open_sessions() if self.block else 0)
                for dead in self.table.sweep():
                    log.info("peer %s declared dead", dead)
                await self.gossip_round(self.table.gossip_targets(self.list_seeds()))
                if not self._moving:
                    self._tasks.append(asyncio.create_task(self._maybe_rebalance()))
                    self._tasks = [t for t in self._tasks if not t.done()]
            except Exception:  # the loop must outlive any one bad round
                log.exception("gossip round failed")

    async def gossip_round(self, targets: list[str], fanout_all: bool = False) -> None:
        if fanout_all:
            targets = [e.peer_id for e in self.table.live() if e.peer_id != self.peer_id][:32]
        await asyncio.gather(*(self._exchange(t) for t in targets))

    async def _exchange(self, address: str) -> None:
        body = {"entries": [e.to_json() for e in self.table.entries()]}
        try:
            r = await self.http.post(
                f"http://{address}{PATH_GOSSIP}", json=body, timeout=self.config.gossip.timeout_s
            )
            r.raise_for_status()
            self.table.merge([PeerEntry.from_json(e) for e in r.json()["entries"]])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            log.debug("gossip with %s failed: %s", address, e)

    def receive_gossip(self, entries: list[dict]) -> list[dict]:
        self.table.merge([PeerEntry.from_json(e) for e in entries])
        return [e.to_json() for e in self.table.entries()]

    # -- steps -----------------------------------------------------------------------------
    async def run_step(self, req: StepRequest) -> StepResult:
        """Run this peer's hop of the step, then the rest of the route; HopFailed names who failed."""
        hop = req.hops[0]
        block = self.block
        if block is None or hop.peer_id != self.peer_id:
            raise HopFailed(self.peer_id, f"this peer cannot run hop {hop.start}:{hop.end} for {hop.peer_id}")
        if not block.span.start <= hop.start < hop.end <= block.span.end:
            raise HopFailed(
                self.peer_id, f"layers {hop.start}:{hop.end} are not inside its span {block.span}"
            )
        if self.steps_in_flight >= self.config.max_queue:
            raise HopFailed(self.peer_id, f"{self.steps_in_flight} steps already queued (max_queue)", "busy")
        loop = asyncio.get_running_loop()
        self.steps_in_flight += 1
        try:
            work = loop.run_in_executor(self._compute, self._compute_hop, block, req, hop)
            out = await asyncio.wait_for(work, req.hop_timeout_s)
        except TimeoutError:
            raise HopFailed(self.peer_id, f"its own layers took over {req.hop_timeout_s:.1f} s") from None
        except SessionError as e:
            raise HopFailed(self.peer_id, str(e), "session_lost") from e
        except CacheFullError as e:
            raise HopFailed(self.peer_id, str(e), "cache_full") from e
        except Exception as e:  # a bug, a torch or CUDA error: this hop failed, the entry fails over
            log.warning("step failed here: %s: %s", type(e).__name__, e)
            raise HopFailed(self.peer_id, f"{type(e).__name__}: {e}") from e
        finally:
            self.steps_in_flight -= 1
        self.steps_served += 1
        if isinstance(out, StepResult):
            return out
        return await self.push(replace(req, hops=req.hops[1:], tensor=out))

    def _compute_hop(self, block: Block, req: StepRequest, hop: Hop):
        out = block(req.session_id, req.tensor, req.position, layers=(hop.start, hop.end))
        if not torch.isfinite(out).all():
            raise ValueError(f"non-finite values in the output of layers {hop.start}:{hop.end}")
        if hop.end < self.total_layers:
            return out  # hidden states [B, T, H]
        s = req.sampling
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed)
        step = req.position + req.tensor.shape[1]  # the position of the token being chosen
        tokens, logprobs = sample(out[:, -1], params, step)
        return StepResult(tokens.tolist(), logprobs.tolist())

    async def push(self, req: StepRequest) -> StepResult:
        """Send the step on to the next hop; its reply (or which peer failed) comes back."""
        nxt = req.hops[0]
        timeout = req.hop_timeout_s * len(req.hops)
        try:
            r = await self.http.post(
                f"http://{nxt.address}{PATH_STEP}",
                content=encode_step(req),
                headers={"content-type": STEP_CONTENT_TYPE},
                timeout=timeout,
            )
        except httpx.TimeoutException:
            raise HopFailed(nxt.peer_id, f"no answer within {timeout:.1f} s") from None
        except httpx.HTTPError as e:
            raise HopFailed(nxt.peer_id, f"{type(e).__name__}: {e}") from None
        except ProtocolError as e:
            raise HopFailed(self.peer_id, str(e)) from None
        return parse_step_reply(r, nxt.peer_id)

    async def close_sessions(self, session_id: str, hops: list[Hop]) -> None:
        """Free the session on every peer of a route (best effort, bounded)."""

        async def close_one(hop: Hop) -> None:
            if hop.peer_id == self.peer_id:
                if self.block is not None:
                    self.block.close(session_id)
                return
            try:
                await self.http.post(
                    f"http://{hop.address}{PATH_CLOSE}", json={"session_id": session_id}, timeout=2.0
                )
            except httpx.HTTPError:
                pass  # the peer's idle expiry frees it

        await asyncio.gather(*(close_one(h) for h in hops))


def parse_step_reply(r: httpx.Response, peer_id: str) -> StepResult:
    try:
        data = r.json()
    except ValueError:
        raise HopFailed(peer_id, f"status {r.status_code} with a body that is not JSON") from None
    if r.status_code != 200:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        failed = err.get("failed_peer") or peer_id
        reason = err.get("type") if err.get("type") in HopFailed.REASONS else "failed"
        message = err.get("message", f"status {r.status_code}").removeprefix(f"peer {failed} failed: ")
        raise HopFailed(failed, message, reason)
    try:
        return StepResult([int(t) for t in data["tokens"]], [float(x) for x in data["logprobs"]])
    except (KeyError, TypeError, ValueError):
        raise HopFailed(peer_id, "a step reply without tokens") from None


def _initial_span(layers: str | None, total: int) -> tuple[int, int]:
    if layers is None:
        return 0, 0  # chosen once the swarm is known
    from inference import parse_span

    span = parse_span(layers, total)
    return span.start, span.end
