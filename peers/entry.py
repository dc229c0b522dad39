"""The entry's generation loop: plan a route, prefill, decode token by token; on a failed hop,
ban the peer, re-plan and replay prompt + generated tokens as one prefill, then go on. Retries
and backoff live here and nowhere else."""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from .errors import HopFailed, SwarmUnavailable
from .node import PeerNode
from .protocol import Hop, Sampling, StepRequest, StepResult
from .routing import NoRouteError, plan_route

log = logging.getLogger("layerswarm.entry")


@dataclass
class _Ban:
    until: float
    strikes: int
    incarnation: int


class Bans:
    """Peers this entry avoids after failures: the ban doubles with each repeat; it is lifted by
    a success through that peer or by a new life (incarnation) of it."""

    def __init__(self, first_s: float, max_s: float, clock=time.monotonic):
        self.first_s, self.max_s, self.clock = first_s, max_s, clock
        self._bans: dict[str, _Ban] = {}

    def ban(self, peer_id: str, incarnation: int) -> float:
        now = self.clock()
        for p in [p for p, b in self._bans.items() if b.until + self.max_s < now]:
            del self._bans[p]  # long expired: its strikes are forgiven (keeps the map bounded)
        old = self._bans.get(peer_id)
        strikes = old.strikes + 1 if old and old.incarnation == incarnation else 1
        duration = min(self.max_s, self.first_s * 2 ** (strikes - 1))
        self._bans[peer_id] = _Ban(now + duration, strikes, incarnation)
        return duration

    def banned(self, incarnations: dict[str, int]) -> set[str]:
        now = self.clock()
        return {
            p
            for p, b in self._bans.items()
            if b.until > now and incarnations.get(p, b.incarnation) == b.incarnation
        }

    def proven(self, peer_id: str) -> None:
        self._bans.pop(peer_id, None)


@dataclass(frozen=True)
class Token:
    token: int
    logprob: float


def current_route(node: PeerNode, key: str, exclude: set[str]) -> list[Hop]:
    peers = node.table.serving(node.model_id)
    return plan_route(peers, node.total_layers, key, node.model_id, exclude)


def banned_now(node: PeerNode) -> set[str]:
    incarnations = {e.peer_id: e.incarnation for e in node.table.live()}
    return node.bans.banned(incarnations)


async def step(
    node: PeerNode, route: list[Hop], session_id: str, ids: list[int], position: int, sampling: Sampling
) -> StepResult:
    req = StepRequest(
        session_id=session_id,
        position=position,
        hops=route,
        sampling=sampling,
        tensor=torch.tensor([ids], dtype=torch.int64),
        hop_timeout_s=node.config.hop_timeout_s,
    )
    if route[0].peer_id == node.peer_id:
        return await node.run_step(req)
    return await node.push(req)


async def generate(
    node: PeerNode, prompt_ids: list[int], max_tokens: int, sampling: Sampling, stop_ids: frozenset[int]
) -> AsyncIterator[Token]:
    """Yield the new tokens of one sequence; survives failing peers until failover_timeout_s."""
    generated: list[int] = []
    key = uuid.uuid4().hex  # routing key; prefix-keyed routing comes with prefix KV reuse
    session_id, route = key, None
    failing_since: float | None = None
    full: dict[str, str] = {}  # peers with no room for this request -> why (avoided, not banned)
    delay = 0.05
    try:
        while len(generated) < max_tokens:
            if route is None:
                try:
                    route = current_route(node, key, banned_now(node) | set(full))
                except NoRouteError as e:
                    if failing_since is None:
                        raise SwarmUnavailable(str(e)) from None
                    if full:  # healthy peers without room: say so now, the caller may retry
                        raise SwarmUnavailable(
                            f"no room for this request: {next(iter(full.values()))}"
                        ) from None
                    _give_up_if_late(node, failing_since, str(e))
                    await asyncio.sleep(delay)
                    delay = min(1.0, delay * 2)
                    continue
                pending, position = prompt_ids + generated, 0  # (re)play everything so far
            try:
                result = await step(node, route, session_id, pending, position, sampling)
            except HopFailed as e:
                failing_since = failing_since or time.monotonic()
                _handle_failure(node, e, route, session_id, full)
                _give_up_if_late(node, failing_since, e.message)
                session_id, route = uuid.uuid4().hex, None
                continue
            if failing_since is not None:
                log.info("failover done: continuing on %s", " -> ".join(h.peer_id for h in route))
                for hop in route:
                    node.bans.proven(hop.peer_id)
                failing_since, delay = None, 0.05
            token = result.tokens[0]
            generated.append(token)
            yield Token(token, result.logprobs[0])
            if token in stop_ids:
                return
            position += len(pending)
            pending = [token]
    finally:
        if route is not None:
            _background(node, node.close_sessions(session_id, route))


def _handle_failure(
    node: PeerNode, e: HopFailed, route: list[Hop], session_id: str, full: dict[str, str]
) -> None:
    """Only a peer at fault is banned; one without room is avoided by this request; a lost
    session is simply replayed."""
    if e.reason == "failed":
        entry = next((x for x in node.table.live() if x.peer_id == e.peer_id), None)
        duration = node.bans.ban(e.peer_id, entry.incarnation if entry else 0)
        node.table.report_failure(e.peer_id)
        log.warning("%s; banned for %.1f s, re-routing", e.message, duration)
    elif e.reason in ("cache_full", "busy"):
        full[e.peer_id] = e.message
        log.info("%s; re-routing around it", e.message)
    else:
        log.info("%s; replaying", e.message)
    survivors = [h for h in route if h.peer_id != e.peer_id]
    _background(node, node.close_sessions(session_id, survivors))


def _give_up_if_late(node: PeerNode, since: float, why: str) -> None:
    if time.monotonic() - since > node.config.failover_timeout_s:
        raise SwarmUnavailable(f"gave up after {node.config.failover_timeout_s:.0f} s of failover: {why}")


def _background(node: PeerNode, coro) -> None:
    task = asyncio.ensure_future(coro)
    node.background.add(task)
    task.add_done_callback(node.background.discard)
