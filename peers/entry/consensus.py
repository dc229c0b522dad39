"""Checked generation at the entry: a token reaches the user only once other peers computed
the same.

- `--verify-rate R` (verified_generate): that share of requests has every hop that has another
  replica recomputed by it at every step, on the same input (its shadow: the hop before it sends
  both the same hidden states, and the shadow answers only its commitment, peers/swarm/commitments.py). The
  entry compares each hop's commitment with its shadow's. On a disagreement a referee route that
  avoids both recomputes the step from the agreed tokens; the one it contradicts is convicted
  (avoided for --liar-ban seconds, whatever life it starts, and accused by gossip with the
  evidence), the step's tokens are the referee's side, and generation goes on on a new route.
- `consensus: k` (checked_generate, a request field): k whole routes, as disjoint as the swarm
  allows, in lockstep; the majority decides each step (between two, a referee route), and a
  route in the minority is convicted the same way and replaced.

Sampling with a temperature draws from a seed (the request's, or a random one) so that honest
routes draw the same tokens."""

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from inference.sampling import MIN_TEMPERATURE
from peers.entry.generation import Token, _route, banned_now, generate
from peers.entry.peer import EntryPeer
from peers.entry.prefix import routing_key
from peers.entry.steering import Steering
from peers.swarm.commitments import agree, greedy_choice
from peers.swarm.routing import NoRouteError
from peers.transport.errors import SwarmUnavailable
from peers.transport.frames import Hop, Sampling, StepResult

log = logging.getLogger("layerswarm.verify")

MAX_CONSENSUS = 5


@dataclass
class _Runner:
    """One route's generation: its iterator and what it saw at each step."""

    gen: AsyncIterator
    last: tuple | None = None  # (route, result) of its latest step that made tokens
    tokens: list[Token] | None = None  # of its latest step

    @classmethod
    def start(
        cls,
        node,
        prompt_ids,
        max_tokens,
        sampling,
        stop_ids,
        n,
        history,
        avoid,
        strict,
        shadowed=False,
        steering=None,
    ) -> "_Runner":
        """A generation from `history` on (see generate()), its steps observed."""
        runner = cls(None)
        runner.gen = generate(
            node,
            prompt_ids,
            max_tokens,
            sampling,
            stop_ids,
            n,
            history=[list(h) for h in history],
            avoid=frozenset(avoid),
            strict_avoid=strict,
            observe=lambda route, result: setattr(runner, "last", (route, result)),
            shadowed=shadowed,
            steering=steering,
        )
        return runner

    async def next(self) -> list[Token] | None:
        try:
            self.tokens = await anext(self.gen)
        except StopAsyncIteration:
            self.tokens = None
        return self.tokens

    @property
    def route(self) -> list[Hop]:
        return self.last[0] if self.last else []

    @property
    def result(self) -> StepResult:
        return self.last[1]

    async def close(self) -> None:
        await self.gen.aclose()


def _peers(route: list[Hop]) -> set[str]:
    return {h.peer_id for h in route}


def _planned(node: EntryPeer, key: str, avoid: set[str]) -> list[Hop] | None:
    """The route a generation avoiding `avoid` would take now (None: no route at all)."""
    try:
        return _route(node, key, banned_now(node), frozenset(avoid), strict=False)
    except NoRouteError:
        return None


def _boundaries(result: StepResult) -> dict[int, object]:
    return {c.end: c for c in result.commitments}


def same_step(a: StepResult, b: StepResult, greedy: bool) -> tuple[bool, int, int]:
    """Whether two routes computed the same step: (agree, from, to), where [from, to) are the
    layers of the first disagreement, between the last boundary both committed to equally and the
    first they committed to differently (the model's end if only the tokens differ)."""
    ca, cb = _boundaries(a), _boundaries(b)
    last_equal = 0
    for end in sorted(ca.keys() & cb.keys()):
        if not agree(ca[end], cb[end]):
            return False, last_equal, end
        last_equal = end
    final = max([0, *ca, *cb])
    logits_agree = final in ca and final in cb  # (every shared boundary agreed above)
    ties = logits_agree and (
        not greedy or (greedy_choice(ca[final], a.tokens) and greedy_choice(cb[final], b.tokens))
    )
    if a.tokens != b.tokens and not ties:  # equal logits, other tokens: a near tie broken two ways
        return False, last_equal, final
    return True, 0, 0


def _suspects(route: list[Hop], other: list[Hop], start: int, end: int) -> list[Hop]:
    """The hops of `route` that computed layers in [start, end) and are not `other`'s peers."""
    theirs = _peers(other)
    return [h for h in route if h.start < end and h.end > start and h.peer_id not in theirs]


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
    sampling = _seeded(sampling)
    greedy = _plain_greedy(sampling, steering)
    key = routing_key(prompt_ids)
    history: list[list[int]] = [[] for _ in range(n)]
    stats = node.verification

    def start(avoid: set[str], strict: bool = False) -> _Runner:
        return _Runner.start(
            node, prompt_ids, max_tokens, sampling, stop_ids, n, history, avoid, strict, steering=steering
        )

    used: set[str] = set()
    first = _planned(node, key, set())
    if first is None:
        raise SwarmUnavailable("no complete route of serving peers for this model")
    runners, planned = [], [first]
    for _ in range(routes - 1):
        used |= _peers(planned[-1])
        planned.append(_planned(node, key, used) or first)
    if all(_peers(r) == _peers(first) for r in planned):  # no other replica of any hop
        stats.unverifiable += 1
        log.info("no other replica of any layer of this request's route: it runs unchecked")
        async for tokens in generate(node, prompt_ids, max_tokens, sampling, stop_ids, n, steering=steering):
            yield tokens
        return
    stats.requests += 1
    avoid: set[str] = set()
    for _ in range(routes):
        runners.append(start(avoid))
        avoid = avoid | _peers(planned[len(runners) - 1])
    try:
        while True:
            outs = await asyncio.gather(*(r.next() for r in runners), return_exceptions=True)
            for out in outs:  # every route has stopped moving: closing them below is safe
                if isinstance(out, BaseException):
                    raise out
            if all(o is None for o in outs):
                return
            if any(o is None for o in outs):
                raise SwarmUnavailable("the routes of this request stopped at different steps")
            stats.steps += 1
            if greedy:
                runners = await _drop_false_tokens(node, runners)
            groups: list[list[int]] = []  # runner indices that computed the same step
            for i, runner in enumerate(runners):
                for group in groups:
                    if same_step(runners[group[0]].result, runner.result, greedy)[0]:
                        group.append(i)
                        break
                else:
                    groups.append([i])
            if len(groups) > 1:
                stats.disagreements += 1
                runners = await _decide(node, runners, groups, start, greedy)
            tokens = runners[0].tokens
            for seq, tok in zip(history, tokens, strict=True):
                seq.append(tok.token)
            ids = [t.token for t in tokens]
            for runner in [r for r in runners if [t.token for t in r.tokens] != ids]:
                await runner.close()  # it took the other side of a near tie: it restarts on these tokens
                runners.remove(runner)
            while len(runners) < routes:  # replace the routes closed, from the next step on
                taken = set().union(*(_peers(r.route) for r in runners))
                runners.append(start(taken))
            yield tokens
    finally:
        await asyncio.gather(*(r.close() for r in runners), return_exceptions=True)


async def _drop_false_tokens(node: EntryPeer, runners: list[_Runner]) -> list[_Runner]:
    """Greedy tokens must be the argmax of the logits the last hop signed: a last hop that
    answers another token convicts itself."""
    kept = []
    for runner in runners:
        if _true_tokens(node, runner.route, runner.result, runner.tokens):
            kept.append(runner)
        else:
            await runner.close()
    if not kept:
        raise SwarmUnavailable("verification failed: every route's last peer answered a false token")
    return kept


def _independent(runners: list[_Runner], group: list[int], greedy: bool) -> bool:
    """Whether a majority's routes are votes of their own: no peer computes, for two of them,
    the layers where they disagree with the others (routes sharing a liar there agree)."""
    others = [r for i, r in enumerate(runners) if i not in group]
    for other in others:
        _, lo, hi = same_step(runners[group[0]].result, other.result, greedy)
        seen: set[str] = set()
        for i in group:
            peers = {h.peer_id for h in runners[i].route if h.start < hi and h.end > lo}
            if peers & seen:
                return False
            seen |= peers
    return True


def _evidence(node: EntryPeer, hop: Hop, wrong: StepResult, right: StepResult, boundary: int):
    """The accused hop's commitment and another peer's at the boundary where they disagree, when
    the hop's own output is that boundary's (else None: this entry convicts, but cannot accuse)."""
    mine, theirs = _boundaries(wrong).get(boundary), _boundaries(right).get(boundary)
    if mine is None or theirs is None or mine.peer_id != hop.peer_id:
        return None
    if theirs.peer_id in (hop.peer_id, node.peer_id):
        return None
    return mine, theirs


async def _decide(node: EntryPeer, runners: list[_Runner], groups: list[list[int]], start, greedy: bool):
    """Routes disagreed on a step: the majority (or, with no majority, a referee route that
    avoids every suspect) decides; the minority's suspects are convicted and its routes closed.
    Returns the runners to go on with, one that computed the step right first."""
    groups = sorted(groups, key=len, reverse=True)
    keep: list[_Runner] = []
    if len(groups[0]) * 2 > len(runners) and _independent(runners, groups[0], greedy):
        winners = groups[0]
    else:  # no majority: a referee decides
        suspects: set[str] = set()
        for i, a in enumerate(runners):
            for b in runners[i + 1 :]:
                ok, lo, hi = same_step(a.result, b.result, greedy)
                if not ok:
                    suspects |= {h.peer_id for h in _suspects(a.route, b.route, lo, hi)}
                    suspects |= {h.peer_id for h in _suspects(b.route, a.route, lo, hi)}
        referee = start(suspects, strict=True)
        try:
            if await referee.next() is None:
                raise SwarmUnavailable("the referee route produced nothing")
        except SwarmUnavailable as e:
            await referee.close()
            raise SwarmUnavailable(
                f"verification failed: routes disagree (suspects {', '.join(sorted(suspects))}) and no "
                f"other replica of their layers can decide: {e}"
            ) from None
        agreeing = [g for g in groups if same_step(runners[g[0]].result, referee.result, greedy)[0]]
        if not agreeing:
            await referee.close()
            raise SwarmUnavailable("verification failed: three routes computed three different steps")
        winners, keep = agreeing[0], [referee]
    right = runners[winners[0]]
    for i, runner in enumerate(runners):
        if i in winners:
            continue
        _, lo, hi = same_step(runner.result, right.result, greedy)
        suspects = _suspects(runner.route, right.route, lo, hi)
        if len(suspects) != 1:  # the commitments do not pin the disagreement on one peer
            log.warning(
                "a route disagreed with the majority in layers %d:%d through %d peers of its own: "
                "it is dropped, nobody is convicted",
                lo,
                hi,
                len(suspects),
            )
            suspects = []
        for hop in suspects:
            why = f"its layers {hop.start}:{hop.end} disagreed with {len(winners) + len(keep)} other routes"
            node.convict(hop.peer_id, why, _evidence(node, hop, runner.result, right.result, hi))
        await runner.close()
    return [runners[i] for i in winners] + keep


def _seeded(sampling: Sampling) -> Sampling:
    """Sampling with a temperature draws from a seed, so that every route draws the same."""
    if sampling.seed is None and sampling.temperature > 0:
        return replace(sampling, seed=random.getrandbits(62))
    return sampling


def _plain_greedy(sampling: Sampling, steering: Steering | None) -> bool:
    """Greedy on the model's own logits, so that a committed step's token must be their argmax
    (a penalty, a bias or a grammar chooses otherwise)."""
    return (sampling.temperature < MIN_TEMPERATURE or sampling.top_k == 1) and not (
        steering is not None or sampling.steered
    )


async def verified_generate(
    node: EntryPeer,
    prompt_ids: list[int],
    max_tokens: int,
    sampling: Sampling,
    stop_ids: frozenset[int],
    n: int = 1,
    steering: Steering | None = None,
) -> AsyncIterator[list[Token]]:
    """generate(), with every hop that has another replica recomputed by it on the same input
    (its shadow: the hop before it sends it the same hidden states) at every step; a token is
    yielded only when each shadow's commitment agrees with its hop's. On a disagreement a referee
    route that avoids both decides; the peer it contradicts is convicted, and generation goes on
    from the agreed tokens on a new route."""
    sampling = _seeded(sampling)
    greedy = _plain_greedy(sampling, steering)
    history: list[list[int]] = [[] for _ in range(n)]
    stats = node.verification
    stats.requests += 1

    def start(avoid: frozenset[str] = frozenset(), shadowed: bool = True) -> _Runner:
        return _Runner.start(
            node,
            prompt_ids,
            max_tokens,
            sampling,
            stop_ids,
            n,
            history,
            avoid,
            bool(avoid),
            shadowed,
            steering,
        )

    runner = start()
    try:
        while True:
            tokens = await runner.next()
            if tokens is None:
                return
            route, result = runner.route, runner.result
            stats.steps += 1
            if not result.shadows:
                stats.unchecked_steps += 1
            if greedy and not _true_tokens(node, route, result, tokens):
                await runner.close()  # its last peer convicted itself: this step again, elsewhere
                runner = start()
                continue
            by_span = {(c.start, c.end): c for c in result.commitments}
            disputes = [
                (by_span[(s.start, s.end)], s)
                for s in result.shadows
                if (s.start, s.end) in by_span and not agree(by_span[(s.start, s.end)], s)
            ]
            if disputes:
                stats.disagreements += 1
                decided = await _referee(node, disputes, tokens, start, [prompt_ids + h for h in history])
                await runner.close()
                runner = None
                if decided is None:  # this step again, on a route without the convicted
                    runner = start()
                    continue
                tokens = decided
            for seq, tok in zip(history, tokens, strict=True):
                seq.append(tok.token)
            if runner is None:
                runner = start()  # around the convicted, from the agreed tokens on
            yield tokens
    finally:
        if runner is not None:
            await runner.close()


def _true_tokens(node: EntryPeer, route: list[Hop], result: StepResult, tokens: list[Token]) -> bool:
    """Greedy tokens must be the argmax of the logits the last peer signed; one that answers
    another token convicts itself (its own signature is the evidence)."""
    last = route[-1]
    final = next((c for c in result.commitments if c.end == last.end), None)
    if final is not None and greedy_choice(final, [t.token for t in tokens]):
        return True
    node.convict(last.peer_id, "its greedy token is not the argmax of the logits it signed")
    return False


async def _referee(node: EntryPeer, disputes, tokens: list[Token], start, rows) -> list[Token] | None:
    """Hops and their shadows disagree: a route avoiding all of them recomputes the step (or,
    with no such route and --self-referee, this entry recomputes the disputed layers itself on
    `rows`, the token sequences so far); the side it contradicts is convicted. Returns the
    step's right tokens, or None when they must be computed again (on a route without the
    convicted)."""
    suspects = frozenset(p for pair in disputes for p in (pair[0].peer_id, pair[1].peer_id))
    referee = start(avoid=suspects, shadowed=False)
    try:
        decided = await referee.next()
        if decided is None:
            raise SwarmUnavailable("the referee route produced nothing")
        theirs = {c.end: c for c in referee.result.commitments}
        how = "a referee route"
    except SwarmUnavailable as e:
        if not node.config.self_referee:
            raise SwarmUnavailable(
                f"verification failed: peers {', '.join(sorted(suspects))} disagree and no other replica "
                f"of their layers can decide (an entry started with --self-referee decides itself): {e}"
            ) from None
        decided, how = None, "this entry's own computation"
        theirs = {end: await node.judge(rows, end) for end in {hop_c.end for hop_c, _ in disputes}}
    finally:
        await referee.close()
    primary_lost = decided is not None and [t.token for t in tokens] != [t.token for t in decided]
    for hop_c, shadow_c in disputes:
        judge = theirs.get(hop_c.end)
        if judge is not None and agree(judge, hop_c) != agree(judge, shadow_c):
            hop_right = agree(judge, hop_c)
        else:  # the referee split the layers otherwise, or sides with neither: nobody is convicted
            log.warning(
                "peers %s and %s disagree on layers %d:%d and %s cannot tell which is wrong",
                hop_c.peer_id,
                shadow_c.peer_id,
                hop_c.start,
                hop_c.end,
                how,
            )
            continue
        wrong, right = (shadow_c, hop_c) if hop_right else (hop_c, shadow_c)
        primary_lost = primary_lost or not hop_right
        node.convict(
            wrong.peer_id,
            f"its layers {wrong.start}:{wrong.end} disagreed with {right.peer_id} and {how}",
            (wrong, right) if right.peer_id != node.peer_id else None,
        )
    if not primary_lost:
        return tokens
    return decided  # None: the step is computed again
