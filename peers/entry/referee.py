"""The referee: where checked routes or a hop and its shadow disagree with no majority, a route
that avoids every suspect recomputes the step (or, with --self-referee and no such route, the
entry recomputes the disputed layers itself); the side it contradicts is convicted."""

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from peers.entry.peer import EntryPeer
from peers.entry.runner import Runner, boundaries, same_step, suspects
from peers.entry.session import Token
from peers.swarm.commitments import Commitment, agree
from peers.transport.errors import SwarmUnavailable

log = logging.getLogger("layerswarm.verify")

Start = Callable[..., Runner]  # starts a runner from the agreed tokens, avoiding the peers given
Judge = Callable[[int], Awaitable[Commitment]]  # --self-referee: this entry's own output at a boundary


@dataclass(frozen=True)
class Verdict:
    """A referee's decision between routes: the indices of the runners it agrees with, and the
    referee's runner (to go on with; None where this entry decided itself)."""

    winners: list[int]
    referee: Runner | None


async def referee_routes(
    runners: list[Runner], groups: list[list[int]], start: Start, greedy: bool, judge: Judge | None = None
) -> Verdict:
    """Routes disagree with no majority: a route that avoids every suspect recomputes the step
    and sides with one group; with no such route, `judge` (--self-referee) recomputes the first
    disputed boundary here (SwarmUnavailable: nobody can decide, or the referee sides with none)."""
    accused: set[str] = set()
    first = None
    for i, a in enumerate(runners):
        for b in runners[i + 1 :]:
            where = same_step(a.result, b.result, greedy)
            if not where.agree:
                first = first or where
                accused |= {h.peer_id for h in suspects(a.route, b.route, where)}
                accused |= {h.peer_id for h in suspects(b.route, a.route, where)}
    referee = start(accused, strict=True)
    try:
        if await referee.next() is None:
            raise SwarmUnavailable("the referee route produced nothing")
    except SwarmUnavailable as e:
        await referee.close()
        if judge is not None and first is not None:
            return await judged(runners, groups, judge, first.end)
        raise SwarmUnavailable(
            f"verification failed: routes disagree (suspects {', '.join(sorted(accused))}) and no "
            f"other replica of their layers can decide (an entry started with --self-referee decides "
            f"itself): {e}"
        ) from None
    agreeing = [g for g in groups if same_step(runners[g[0]].result, referee.result, greedy).agree]
    if not agreeing:
        await referee.close()
        raise SwarmUnavailable("verification failed: three routes computed three different steps")
    return Verdict(agreeing[0], referee)


async def judged(runners: list[Runner], groups: list[list[int]], judge: Judge, end: int) -> Verdict:
    """This entry recomputes layers 0:end itself and sides with the one group whose commitment
    at `end` agrees (SwarmUnavailable: none, or several)."""
    mine = await judge(end)
    agreeing = [
        g for g in groups if (c := boundaries(runners[g[0]].result).get(end)) is not None and agree(mine, c)
    ]
    if len(agreeing) != 1:
        raise SwarmUnavailable(
            f"verification failed: routes disagree on layers up to {end} and this entry's own "
            f"computation agrees with {len(agreeing)} of them"
        )
    return Verdict(agreeing[0], None)


@dataclass(frozen=True)
class Dispute:
    """A hop's commitment and its shadow's, on the same input, that disagree."""

    hop: Commitment
    shadow: Commitment


async def referee_shadows(
    node: EntryPeer, disputes: list[Dispute], tokens: list[Token], start: Start, rows: list[list[int]]
) -> list[Token] | None:
    """Hops and their shadows disagree: a route avoiding all of them recomputes the step (or,
    with no such route and --self-referee, this entry recomputes the disputed layers itself on
    `rows`, the token sequences so far); the side it contradicts is convicted. Returns the
    step's right tokens, or None when they must be computed again (on a route without the
    convicted)."""
    accused = frozenset(p for d in disputes for p in (d.hop.peer_id, d.shadow.peer_id))
    referee = start(avoid=accused, shadowed=False)
    try:
        decided = await referee.next()
        if decided is None:
            raise SwarmUnavailable("the referee route produced nothing")
        theirs = {c.end: c for c in referee.result.commitments}
        how = "a referee route"
    except SwarmUnavailable as e:
        if not node.config.self_referee:
            raise SwarmUnavailable(
                f"verification failed: peers {', '.join(sorted(accused))} disagree and no other replica "
                f"of their layers can decide (an entry started with --self-referee decides itself): {e}"
            ) from None
        decided, how = None, "this entry's own computation"
        theirs = {end: await node.judge(rows, end) for end in {d.hop.end for d in disputes}}
    finally:
        await referee.close()
    primary_lost = decided is not None and [t.token for t in tokens] != [t.token for t in decided]
    primary_lost = convict_disputes(node, disputes, theirs, how) or primary_lost
    if not primary_lost:
        return tokens
    return decided  # None: the step is computed again


def convict_disputes(
    node: EntryPeer, disputes: list[Dispute], theirs: dict[int, Commitment], how: str
) -> bool:
    """Convict the side of each dispute that the referee's commitments (`theirs`, by the layer
    they end at) contradict; whether any hop on the route lost."""
    hop_lost = False
    for d in disputes:
        judge = theirs.get(d.hop.end)
        if judge is None or agree(judge, d.hop) == agree(judge, d.shadow):
            log.warning(  # the referee split the layers otherwise, or sides with neither
                "peers %s and %s disagree on layers %d:%d and %s cannot tell which is wrong",
                d.hop.peer_id,
                d.shadow.peer_id,
                d.hop.start,
                d.hop.end,
                how,
            )
            continue
        hop_right = agree(judge, d.hop)
        wrong, right = (d.shadow, d.hop) if hop_right else (d.hop, d.shadow)
        hop_lost = hop_lost or not hop_right
        node.convict(
            wrong.peer_id,
            f"its layers {wrong.start}:{wrong.end} disagreed with {right.peer_id} and {how}",
            (wrong, right) if right.peer_id != node.peer_id else None,
        )
    return hop_lost
