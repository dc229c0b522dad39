"""The entry's generation loop: plan a route, prefill, decode step by step; on a failed hop, ban
the peer, re-plan and replay prompt + generated tokens as one prefill, then go on. A busy or full
peer is not at fault: it is avoided, and a request that finds no room before its first token is
told to retry later (429). Retries and backoff live here and nowhere else."""

import asyncio
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import torch
import xxhash

from peers.entry.peer import EntryPeer
from peers.entry.prefix import prefix_hashes, routing_key
from peers.entry.speculative import Drafter, ModelDrafter, accepted_length
from peers.entry.steering import Steering
from peers.swarm.commitments import check_commitments, checked_shadows, with_shadow
from peers.swarm.routing import NoRouteError, plan_route, weight
from peers.transport.direct import probe_route
from peers.transport.errors import HopFailed, Overloaded, SwarmError, SwarmUnavailable
from peers.transport.frames import MAX_SHADOWS, Controls, Hop, ReplyTo, Sampling, StepRequest, StepResult
from peers.transport.logs import REQUEST_ID

log = logging.getLogger("layerswarm.entry")

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Token:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the likeliest tokens and their logprobs (top_logprobs)


def current_route(node: EntryPeer, key: str, exclude: set[str]) -> list[Hop]:
    peers = node.table.serving(node.model_id)
    return plan_route(peers, node.total_layers, key, node.model_id, exclude, origin=node.table.me)


def banned_now(node: EntryPeer) -> set[str]:
    incarnations = {e.peer_id: e.incarnation for e in node.table.live()}
    return node.bans.banned(incarnations)


async def step(
    node: EntryPeer,
    route: list[Hop],
    session_id: str,
    rows: list[list[int]],
    position: int,
    sampling: Sampling,
    prefix: tuple[int, ...] = (),
    verify: str = "",
    shadows: tuple[Hop, ...] = (),
    draft: int = 0,
    controls: tuple[Controls, ...] = (),
) -> StepResult:
    """One step through `route`; `draft`: the last that many tokens of the one row are drafted
    (the result has draft + 1 tokens: what was sampled after each of the last draft + 1 positions)."""
    req = StepRequest(
        session_id=session_id,
        position=position,
        hops=route,
        sampling=sampling,
        tensor=torch.tensor(rows, dtype=torch.int64),  # [B, T]
        prefix=prefix,
        verify=verify,
        shadows=shadows,
        draft=draft,
        request_id=REQUEST_ID.get(),
        controls=controls,
    )
    if not verify and node.config.direct_return:
        main = _direct(node, req)
    else:
        main = node.run_step(req) if route[0].peer_id == node.peer_id else node.forwarder.push(req)
    shadow = next((s for s in shadows if (s.start, s.end) == (route[0].start, route[0].end)), None)
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
    if verify:
        problem = check_commitments(node.table, route, result.commitments, req)
        if problem:  # each hop checks its next one's: the hop before the first wrong one let it by
            at, why = problem
            raise HopFailed(route[max(at - 1, 0)].peer_id, why)
        # a shadow's commitment counts only if it is one this entry asked for, signed, on the same
        # input as its hop's; any other is dropped (that step is then unchecked), never believed
        result = replace(
            result, shadows=checked_shadows(node.table, shadows, result.commitments, result.shadows)
        )
    return result


async def _direct(node: EntryPeer, req: StepRequest) -> StepResult:
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


async def generate(
    node: EntryPeer,
    prompt_ids: list[int],
    max_tokens: int,
    sampling: Sampling,
    stop_ids: frozenset[int],
    n: int = 1,
    *,
    history: list[list[int]] | None = None,
    avoid: frozenset[str] = frozenset(),
    strict_avoid: bool = False,
    observe: Callable[[list[Hop], StepResult], None] | None = None,
    shadowed: bool = False,
    speculative: bool = False,
    steering: Steering | None = None,
) -> AsyncIterator[list[Token]]:
    """Yield the next token of each of `n` sequences of one prompt, step by step, until every
    sequence met a stop id or max_tokens; survives failing peers until failover_timeout_s.

    For checked generation (peers/entry/consensus.py): `history` continues sequences already generated
    (the first step replays them), routes avoid the peers in `avoid` where the swarm allows (always,
    with `strict_avoid`), and with `observe` every hop commits to its output and observe(route,
    result) sees each step that makes tokens before they are yielded; `shadowed` also has every
    hop that has another replica recomputed by one (its shadow), whose commitments come back in
    result.shadows.

    `speculative`: one sequence, unchecked, drafts tokens by prompt lookup and has the chain check
    them in one step (peers/entry/speculative.py); the tokens are the same as without it, and they are
    yielded one at a time, so that a consumer stopping at a stop string never sees past it.

    `steering`: penalties, min_tokens and a grammar, sent with each step that samples (a token
    that breaks what was sent is the last peer's fault: it fails over)."""
    generated: list[list[int]] = [list(h) for h in history] if history else [[] for _ in range(n)]
    finished = [any(t in stop_ids for t in g) for g in generated]
    if generated[0] and all(finished):
        return
    state = steering.start(generated) if steering is not None else None
    key = routing_key(prompt_ids)  # requests sharing a prefix reach the same peers
    reuse = node.config.prefix_reuse
    session_id, route, shadows = uuid.uuid4().hex, None, ()
    failing_since: float | None = None
    full: dict[str, str] = {}  # peers with no room for this request now -> why (avoided, not banned)
    too_large: dict[str, str] = {}  # peers this request can never fit -> why
    delay = 0.05
    drafter = None
    if speculative and n == 1 and observe is None and not shadowed:
        context = prompt_ids + generated[0]
        drafter = Drafter(context) if node.draft_block is None else ModelDrafter(context, node.draft_block)
    try:
        while len(generated[0]) < max_tokens:
            if node.stopping:
                raise SwarmUnavailable("this peer is shutting down; the request was cut short")
            if route is None:
                try:
                    route = _route(
                        node, key, banned_now(node) | set(full) | set(too_large), avoid, strict_avoid
                    )
                except NoRouteError as e:
                    if failing_since is None:
                        raise SwarmUnavailable(str(e)) from None
                    if too_large:  # no peer that could serve these layers can ever hold it
                        raise SwarmUnavailable(
                            f"no room for this request: {next(iter(too_large.values()))}"
                        ) from None
                    if full and not generated[0]:  # healthy peers without room now: come back later
                        raise Overloaded(
                            f"no room for this request: {next(iter(full.values()))}", RETRY_AFTER_S
                        ) from None
                    _give_up_if_late(node, failing_since, str(e))
                    await asyncio.sleep(delay)
                    delay = min(1.0, delay * 2)
                    full.clear()  # room may have freed up meanwhile
                    continue
                if shadowed:
                    shadows = _shadows(
                        node, key, route, banned_now(node) | set(full) | set(too_large) | avoid
                    )
                plan = _plan(prompt_ids, generated, n)  # (re)play everything so far
                position = 0
            rows, widen = plan[0]
            # (shadows recompute the whole prompt with their hop: they may not hold its prefix)
            prefix = prefix_hashes(prompt_ids) if reuse and position == 0 and not shadows else ()
            verify = _context(prompt_ids, generated) if observe is not None else ""
            draft: list[int] = []
            controls: tuple[Controls, ...] = ()
            if drafter is not None and position > 0:  # a decode step: the chain checks drafts too
                room = min(max_tokens - len(generated[0]), node.context_length - position) - 1
                draft = drafter.propose(room)
                if draft is None:  # nothing to look up: the entry's draft model drafts
                    try:
                        draft = await node.scheduler.run_in_compute(drafter.draft_with_model, room)
                    except Exception as e:  # an optional speed-up never fails the request
                        log.warning(
                            "the draft model failed (%s: %s); prompt lookup only", type(e).__name__, e
                        )
                        await node.scheduler.run_in_compute(drafter.drop_model)
                        draft = []
                if state is not None:
                    controls, draft = state.drafted(generated[0], draft)
                rows = [rows[0] + draft]
            elif state is not None and not widen and len(plan) == 1:  # this step's tokens are kept
                controls = state.controls(generated)
            try:
                result = await step(
                    node,
                    route,
                    session_id,
                    rows,
                    position,
                    sampling,
                    prefix,
                    verify,
                    shadows,
                    len(draft),
                    controls,
                )
                why = state.violation(controls, result.tokens) if controls else None
                if why:
                    raise HopFailed(route[-1].peer_id, why)
            except HopFailed as e:
                failing_since = failing_since or time.monotonic()
                node.failovers += 1
                node.metrics.failovers.labels(e.reason).inc()  # (one of HopFailed.REASONS)
                node.failover_log.append(
                    {"at": time.time(), "peer_id": e.peer_id, "reason": e.reason, "message": e.message[:300]}
                )
                _handle_failure(
                    node, e, [*route, *shadows], session_id, too_large if e.reason == "too_large" else full
                )
                _give_up_if_late(node, failing_since, e.message)
                if e.reason == "session_lost":
                    reuse = False  # a peer could not rebuild a reused prefix: compute it in full
                session_id, route, shadows = uuid.uuid4().hex, None, ()
                continue
            if failing_since is not None:
                log.info("failover done: continuing on %s", " -> ".join(h.peer_id for h in route))
                for hop in route:
                    node.bans.proven(hop.peer_id)
                failing_since, delay = None, 0.05
            if draft:
                kept = accepted_length(draft, result.tokens)
                drafter.record(len(draft), kept)
                node.speculation.record(len(draft), kept)
                position += kept + 1  # the next step starts there: the peers drop the rest
                new = _tokens(result)[: kept + 1]
                for tok in new:
                    generated[0].append(tok.token)
                    if state is not None:
                        state.advance(0, tok.token)
                    drafter.extend([tok.token])
                    yield [tok]
                    if tok.token in stop_ids or len(generated[0]) >= max_tokens:
                        return
                plan = [([[generated[0][-1]]], False)]
                continue
            position += len(rows[0])
            plan = plan[1:]
            if widen:
                continue  # the prompt's last token was sent n times; this step's tokens follow
            if plan:  # the prompt's last token is next, sent to every sequence
                continue
            tokens = _tokens(result)
            if len(tokens) != n:
                raise SwarmError(f"the last peer sampled {len(tokens)} sequences, {n} were asked for")
            for i, tok in enumerate(tokens):
                generated[i].append(tok.token)
                if state is not None:
                    state.advance(i, tok.token)
                finished[i] = finished[i] or tok.token in stop_ids
            if drafter is not None:
                drafter.extend([tokens[0].token])
            if observe is not None:
                observe(route, result)
            yield tokens
            if all(finished):
                return
            plan = [([[g[-1]] for g in generated], False)]
    finally:
        if route is not None:
            node.spawn(node.close_sessions(session_id, [*route, *shadows]))
        if isinstance(drafter, ModelDrafter):  # (on the compute thread: a draft may be running there)
            node.spawn(node.scheduler.run_in_compute(drafter.close))


def _tokens(result: StepResult) -> list[Token]:
    tops = result.alternatives or [()] * len(result.tokens)
    return [Token(t, lp, top) for t, lp, top in zip(result.tokens, result.logprobs, tops, strict=True)]


def _route(node: EntryPeer, key: str, exclude: set[str], avoid: frozenset[str], strict: bool) -> list[Hop]:
    """A route around `exclude`, and around as many of the peers in `avoid` as the swarm allows
    (all of them, with `strict`)."""
    if strict or not avoid:
        return current_route(node, key, exclude | avoid)
    excluded = set(exclude)
    current_route(node, key, excluded)  # NoRouteError: none at all
    for peer in sorted(avoid):
        try:
            current_route(node, key, excluded | {peer})
            excluded.add(peer)
        except NoRouteError:
            continue  # no route without it: keep it
    return current_route(node, key, excluded)


def _shadows(node: EntryPeer, key: str, route: list[Hop], exclude: set[str]) -> tuple[Hop, ...]:
    """For each hop, a replica off the route that serves its layers, chosen by rendezvous hashing
    on the request's key (none where the swarm has no other)."""
    on_route = {h.peer_id for h in route}
    peers = [p for p in node.table.serving(node.model_id) if p.peer_id not in on_route | exclude]
    shadows = []
    for hop in route:
        fits = [p for p in peers if p.start <= hop.start and hop.end <= p.end]
        if fits:  # one hop per shadow: a session is one run of layers on each peer
            best = max(fits, key=lambda p: weight(key, p.peer_id))
            shadows.append(Hop(best.peer_id, best.address, hop.start, hop.end))
            peers.remove(best)
    return tuple(shadows[:MAX_SHADOWS])


def _context(prompt_ids: list[int], generated: list[list[int]]) -> str:
    """A digest of the tokens a step continues: hops sign it with their commitments."""
    h = xxhash.xxh3_128(struct.pack(f"<{len(prompt_ids)}q", *prompt_ids))
    for g in generated:
        h.update(b"|" + struct.pack(f"<{len(g)}q", *g))
    return h.hexdigest()


def _plan(prompt_ids: list[int], generated: list[list[int]], n: int) -> list[tuple[list[list[int]], bool]]:
    """The steps that (re)build a session: [(rows [B][T], widens)]. One sequence: the whole
    history as one prefill. Several from scratch: the prompt but its last token once, then that
    token once per sequence (the session widens; every sequence samples its own first token).
    Several after a failover: each sequence's own history, all in one prefill."""
    if n == 1 or generated[0]:
        return [([prompt_ids + g for g in generated], False)]
    if len(prompt_ids) == 1:
        return [([prompt_ids] * n, False)]
    return [([prompt_ids[:-1]], True), ([prompt_ids[-1:]] * n, False)]


def _handle_failure(
    node: EntryPeer, e: HopFailed, route: list[Hop], session_id: str, avoided: dict[str, str]
) -> None:
    """Only a peer at fault is banned; one without room is avoided by this request (in
    `avoided`: full or busy now, or too small for it ever); a lost session is simply replayed."""
    if e.reason == "failed":
        entry = next((x for x in node.table.live() if x.peer_id == e.peer_id), None)
        duration = node.bans.ban(e.peer_id, entry.incarnation if entry else 0)
        node.table.report_failure(e.peer_id)
        log.warning("%s; banned for %.1f s, re-routing", e.message, duration)
    elif e.reason in ("cache_full", "busy", "too_large"):
        avoided[e.peer_id] = e.message
        log.info("%s; re-routing around it", e.message)
    elif e.reason == "bad_request":
        raise SwarmError(f"a peer refused this entry's step: {e.message}")
    else:
        log.info("%s; replaying", e.message)
    node.spawn(node.close_sessions(session_id, route))


def _give_up_if_late(node: EntryPeer, since: float, why: str) -> None:
    if time.monotonic() - since > node.config.failover_timeout_s:
        raise SwarmUnavailable(f"gave up after {node.config.failover_timeout_s:.0f} s of failover: {why}")
