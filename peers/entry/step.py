"""One step of a request through its route: build the step frame (a checked one carries a seal per
hop: each hop alone learns which shadow it feeds), send it (nested, or with direct return), have
the first hop's shadow recompute it, and check what came back (token count and range,
commitments): a wrong answer is a HopFailed naming the peer at fault."""

import random
import uuid
from dataclasses import replace

import torch

from peers.entry.peer import EntryPeer
from peers.entry.session import Ask, RouteSession
from peers.swarm.commitments import check_commitments, checked_shadows, with_shadow
from peers.swarm.record import UNREACHABLE
from peers.transport.direct import probe_route
from peers.transport.errors import HopFailed
from peers.transport.frames import Hop, ReplyTo, Sampling, StepRequest
from peers.transport.logs import REQUEST_ID
from peers.transport.results import StepResult


def uniform_steps(node: EntryPeer) -> bool:
    """Whether every step this entry sends must look like a checked one: it checks some of its
    requests (--verify-rate), so each of its steps carries the verify digest (every hop commits),
    returns through the route, drafts nothing and samples from a seed (prefix reuse stays: checked
    steps reuse prefixes too); a hop then cannot tell the steps its shadow recomputes from the
    others, and a liar honest only when checked lies into a check."""
    return node.config.verify_rate > 0


def seeded(sampling: Sampling) -> Sampling:
    """Sampling with a temperature draws from a seed, so that every route draws the same (and a
    checked request's frames carry a seed exactly when an unchecked one's do)."""
    if sampling.seed is None and sampling.temperature > 0:
        return replace(sampling, seed=random.getrandbits(62))
    return sampling


async def step(node: EntryPeer, session: RouteSession, ask: Ask, sampling: Sampling) -> StepResult:
    """One step of `session` on its route; with `ask.draft`, the last that many tokens of the one
    row are drafted (the result has draft + 1 tokens: what was sampled after each of the last
    draft + 1 positions)."""
    route, shadows, rows, draft, verify = session.route, session.shadows, ask.rows, ask.draft, ask.verify
    assert route, "a step needs a route"
    req = StepRequest(
        session_id=session.session_id,
        position=session.position,
        hops=route,
        sampling=sampling,
        tensor=torch.tensor(rows, dtype=torch.int64),  # [B, T]
        prefix=ask.prefix,
        verify=verify,
        seals=session.seals if verify else (),
        draft=draft,
        request_id=REQUEST_ID.get(),
        controls=ask.controls,
        score=ask.score,
    )
    shadow = next((s for s in shadows if (s.start, s.end) == (route[0].start, route[0].end)), None)
    # no hop sees a shadow: each opens its own seal, which names at most its next hop's shadow
    # (an entry that checks sends every step verified; one nobody can dial takes no results at its address)
    if not verify and node.config.direct_return and node.table.me.reach != UNREACHABLE:
        main = direct_step(node, req)
    else:
        main = node.run_step(req) if route[0].peer_id == node.peer_id else node.forwarder.push(req)
    if shadow is None:
        result = await main
    else:  # the first hop's shadow gets the same tokens from here
        result, seen = await with_shadow(main, node.run_shadow(req, shadow))
        result = replace(result, shadows=(*result.shadows, *seen))
    vocab = node.model_config.vocab_size
    expected = draft + 1 if draft else len(rows)
    if len(result.tokens) != expected or not all(0 <= t < vocab for t in result.tokens):
        raise HopFailed(
            route[-1].peer_id,
            f"it answered tokens {result.tokens[:4]!r:.80} where {expected} were asked for; ids must be in [0, {vocab})",
        )
    if ask.score is not None and len(result.prompt) != len(ask.score.targets):
        raise HopFailed(
            route[-1].peer_id,
            f"it scored {len(result.prompt)} prompt positions where {len(ask.score.targets)} were asked for",
        )
    if verify:
        problem = check_commitments(
            node.table, route, result.commitments, req, unsigned_ok=unused(route, shadows)
        )
        if problem:  # each hop checks its next one's: the hop before the first wrong one let it by
            at, why = problem
            raise HopFailed(route[max(at - 1, 0)].peer_id, why)
        # a shadow's commitment counts only if it is one this entry asked for, signed, on the same
        # input as its hop's; any other is dropped (that step is then unchecked), never believed
        result = replace(
            result, shadows=checked_shadows(node.table, shadows, result.commitments, result.shadows)
        )
    return result


def unused(route: list[Hop], shadows: tuple[Hop, ...]) -> frozenset[int]:
    """The hops whose signatures the entry need not check: past the first (the hop before each
    checked it), not the last (its logits check greedy tokens) and not shadowed (compared with
    the shadow's): every step of a checking entry commits, at ~0.1 ms a signature."""
    shadowed = {(s.start, s.end) for s in shadows}
    return frozenset(i for i, h in enumerate(route[:-1]) if i > 0 and (h.start, h.end) not in shadowed)


async def direct_step(node: EntryPeer, req: StepRequest) -> StepResult:
    """Send the step with direct return (peers/transport/direct.py): the first hop takes it on, the last
    sends the result here; a failure reported by a hop, or found by probing a late step, is a
    HopFailed naming the peer at fault."""
    step_id = uuid.uuid4().hex
    req = replace(req, reply_to=ReplyTo(node.peer_id, node.config.address), step_id=step_id)
    pending = node.returns.expect(step_id, req.hops)
    try:
        if req.hops[0].peer_id == node.peer_id:
            await node.accept_step(req)
        else:
            await node.forwarder.push(req)
    except BaseException:
        node.returns.discard(step_id)
        raise

    def probe(route: list[Hop], sid: str):
        return probe_route(node.http, node.peer_id, node.progress, route, sid)

    return await node.returns.wait(step_id, pending, node.forwarder.route_deadline_s(req), probe)
