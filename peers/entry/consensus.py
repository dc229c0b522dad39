"""Consensus (`consensus: k`, a request field): k whole routes, as disjoint as the swarm allows, in
lockstep; the majority decides each step (between two, a referee route), and the peer a minority
route's disagreement pins is convicted (--liar-ban, across lives, accused by gossip) and replaced."""

import asyncio
import logging
from collections.abc import AsyncIterator

from peers.entry.generation import generate
from peers.entry.peer import EntryPeer
from peers.entry.prefix import routing_key
from peers.entry.referee import Judge, Start, referee_routes
from peers.entry.routes import peers_of, planned_route
from peers.entry.runner import (
    Comparison,
    Request,
    Runner,
    boundaries,
    plain_greedy,
    same_step,
    suspects,
    true_tokens,
)
from peers.entry.session import Token
from peers.entry.steering import Steering
from peers.entry.step import seeded
from peers.entry.verification import verified_generate
from peers.swarm.commitments import Commitment
from peers.transport.errors import SwarmUnavailable
from peers.transport.frames import Hop, Sampling
from peers.transport.results import StepResult

__all__ = ["MAX_CONSENSUS", "checked_generate", "verified_generate"]

log = logging.getLogger("layerswarm.verify")

MAX_CONSENSUS = 5


class Consensus:
    """The routes of one checked request in lockstep, and the sequences they agreed on."""

    def __init__(self, node: EntryPeer, request: Request, routes: int):
        self.node, self.request, self.routes = node, request, routes
        self.greedy = plain_greedy(request.sampling, request.steering)
        self.history: list[list[int]] = [[] for _ in range(request.n)]
        self.runners: list[Runner] = []

    def start(self, avoid: set[str], strict: bool = False) -> Runner:
        """A route's generation from the agreed tokens on, around `avoid`."""
        return Runner(self.node, self.request, self.history, avoid, strict)

    def open(self, planned: list[list[Hop]]) -> None:
        """One runner per planned route, each avoiding the routes planned before it."""
        avoid: set[str] = set()
        for route in planned:
            self.runners.append(self.start(avoid))
            avoid = avoid | peers_of(route)

    async def step(self) -> list[Token] | None:
        """Every route's next step, decided; the tokens agreed (None: every route is done)."""
        outs = await asyncio.gather(*(r.next() for r in self.runners), return_exceptions=True)
        for out in outs:  # every route has stopped moving: closing them later is safe
            if isinstance(out, BaseException):
                raise out
        if all(o is None for o in outs):
            return None
        if any(o is None for o in outs):
            raise SwarmUnavailable("the routes of this request stopped at different steps")
        stats = self.node.verification
        stats.steps += 1
        if self.greedy:
            self.runners = await drop_false_tokens(self.node, self.runners)
        groups = group_by_step(self.runners, self.greedy)
        if len(groups) > 1:
            stats.disagreements += 1
            self.runners = await decide(
                self.node, self.runners, groups, self.start, self.greedy, self.judge()
            )
        tokens = self.runners[0].tokens
        assert tokens is not None
        for seq, tok in zip(self.history, tokens, strict=True):
            seq.append(tok.token)
        await self._replace_others([t.token for t in tokens])
        return tokens

    def judge(self) -> Judge | None:
        """--self-referee: this entry recomputes a disputed boundary on the agreed sequences."""
        if not self.node.config.self_referee:
            return None
        rows = [self.request.prompt_ids + h for h in self.history]
        return lambda end: self.node.judge(rows, end)

    async def _replace_others(self, ids: list[int]) -> None:
        for runner in [r for r in self.runners if r.ids != ids]:
            await runner.close()  # it took the other side of a near tie: it restarts on these tokens
            self.runners.remove(runner)
        while len(self.runners) < self.routes:  # replace the routes closed, from the next step on
            taken = set().union(*(peers_of(r.route) for r in self.runners))
            self.runners.append(self.start(taken))

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self.runners), return_exceptions=True)


def plan_routes(node: EntryPeer, key: str, routes: int) -> list[list[Hop]]:
    """`routes` routes, each avoiding the peers of those before it where the swarm allows."""
    first = planned_route(node, key, set())
    if first is None:
        raise SwarmUnavailable("no complete route of serving peers for this model")
    used: set[str] = set()
    planned = [first]
    for _ in range(routes - 1):
        used |= peers_of(planned[-1])
        planned.append(planned_route(node, key, used) or first)
    return planned


async def checked_generate(
    node: EntryPeer,
    prompt_ids: list[int],
    max_tokens: int,
    sampling: Sampling,
    stop_ids: frozenset[int],
    n: int = 1,
    routes: int = 2,
    steering: Steering | None = None,
) -> AsyncIterator[list[Token]]:
    """generate(), on `routes` whole routes in lockstep, as disjoint as the swarm allows (the
    consensus request field): the majority decides each step (between two, a referee route).
    Falls back to one route when the swarm has no other replica of any hop."""
    if not 2 <= routes <= MAX_CONSENSUS:
        raise ValueError(f"checked generation takes 2 to {MAX_CONSENSUS} routes, got {routes}")
    request = Request(prompt_ids, max_tokens, seeded(sampling), stop_ids, n, steering)
    planned = plan_routes(node, routing_key(prompt_ids), routes)
    if all(peers_of(r) == peers_of(planned[0]) for r in planned):  # no other replica of any hop
        node.verification.unverifiable += 1
        log.info("no other replica of any layer of this request's route: it runs unchecked")
        async for tokens in generate(
            node, prompt_ids, max_tokens, request.sampling, stop_ids, n, steering=steering
        ):
            yield tokens
        return
    node.verification.requests += 1
    consensus = Consensus(node, request, routes)
    consensus.open(planned)
    try:
        while (tokens := await consensus.step()) is not None:
            yield tokens
    finally:
        await consensus.close()


def group_by_step(runners: list[Runner], greedy: bool) -> list[list[int]]:
    """The runners' indices, grouped by the step they computed (the same step, same group)."""
    groups: list[list[int]] = []
    for i, runner in enumerate(runners):
        for group in groups:
            if same_step(runners[group[0]].result, runner.result, greedy).agree:
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


async def drop_false_tokens(node: EntryPeer, runners: list[Runner]) -> list[Runner]:
    """Greedy tokens must be the argmax of the logits the last hop signed: a last hop that
    answers another token convicts itself."""
    kept = []
    for runner in runners:
        if true_tokens(node, runner.route, runner.result, runner.tokens or []):
            kept.append(runner)
        else:
            await runner.close()
    if not kept:
        raise SwarmUnavailable("verification failed: every route's last peer answered a false token")
    return kept


def independent(runners: list[Runner], group: list[int], greedy: bool) -> bool:
    """Whether a majority's routes are votes of their own: no peer computes, for two of them,
    the layers where they disagree with the others (routes sharing a liar there agree)."""
    others = [r for i, r in enumerate(runners) if i not in group]
    for other in others:
        where = same_step(runners[group[0]].result, other.result, greedy)
        seen: set[str] = set()
        for i in group:
            peers = {h.peer_id for h in runners[i].route if h.start < where.end and h.end > where.start}
            if peers & seen:
                return False
            seen |= peers
    return True


def evidence(
    node: EntryPeer, hop: Hop, wrong: StepResult, right: StepResult, boundary: int
) -> tuple[Commitment, Commitment] | None:
    """The accused hop's commitment and another peer's at the boundary where they disagree, when
    the hop's own output is that boundary's (else None: this entry convicts, but cannot accuse)."""
    mine, theirs = boundaries(wrong).get(boundary), boundaries(right).get(boundary)
    if mine is None or theirs is None or mine.peer_id != hop.peer_id:
        return None
    if theirs.peer_id in (hop.peer_id, node.peer_id):
        return None
    return mine, theirs


async def decide(
    node: EntryPeer,
    runners: list[Runner],
    groups: list[list[int]],
    start: Start,
    greedy: bool,
    judge: Judge | None = None,
) -> list[Runner]:
    """Routes disagreed on a step: the majority (or, with no majority, a referee route that
    avoids every suspect, else `judge`: this entry itself) decides; the minority's suspects are
    convicted and its routes closed. Returns the runners to go on with, one that computed the
    step right first."""
    groups = sorted(groups, key=len, reverse=True)
    keep: list[Runner] = []
    votes = len(groups[0])
    if len(groups[0]) * 2 > len(runners) and independent(runners, groups[0], greedy):
        winners = groups[0]
    else:  # no majority: a referee decides (a route, or this entry itself)
        verdict = await referee_routes(runners, groups, start, greedy, judge)
        winners, keep = verdict.winners, [verdict.referee] if verdict.referee else []
        votes = len(winners) + 1
    right = runners[winners[0]]
    for i, runner in enumerate(runners):
        if i not in winners:
            where = same_step(runner.result, right.result, greedy)
            convict_minority(node, runner, right, where, votes)
            await runner.close()
    return [runners[i] for i in winners] + keep


def convict_minority(node: EntryPeer, runner: Runner, right: Runner, where: Comparison, votes: int) -> None:
    """Convict the one peer of `runner`'s route that the disagreement `where` pins on, if one."""
    accused = suspects(runner.route, right.route, where)
    if len(accused) != 1:  # the commitments do not pin the disagreement on one peer
        log.warning(
            "a route disagreed with the majority in layers %d:%d through %d peers of its own: "
            "it is dropped, nobody is convicted",
            where.start,
            where.end,
            len(accused),
        )
        return
    hop = accused[0]
    why = f"its layers {hop.start}:{hop.end} disagreed with {votes} other routes"
    node.convict(hop.peer_id, why, evidence(node, hop, runner.result, right.result, where.end))
