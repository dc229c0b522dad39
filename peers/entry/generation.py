"""The entry's generation loop: route, prefill, decode; on a failed hop, account it (reputation),
re-route and replay prompt + tokens so far as one prefill. A peer without room is avoided, not
banned (429 when none has room before the first token). Retries and backoff live here alone."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from peers.entry.peer import EntryPeer
from peers.entry.prefix import prefix_hashes, routing_key
from peers.entry.routes import banned_now, check_rate, current_route, route_around, seals_for, shadows_for
from peers.entry.session import Ask, Observed, Prefill, RouteSession, Token, context_digest, tokens_of
from peers.entry.speculative import Speculation
from peers.entry.steering import Steering, SteerState
from peers.entry.step import seeded, step, uniform_steps
from peers.swarm.reputation import AT_FAULT, STALLED, WRONG_ANSWER, Claim, Reputation
from peers.swarm.routing import NoRouteError
from peers.transport.errors import HopFailed, Overloaded, SwarmError, SwarmUnavailable
from peers.transport.frames import Sampling
from peers.transport.results import StepResult, reporter_of

__all__ = ["RETRY_AFTER_S", "Checks", "NoRoom", "Token", "banned_now", "current_route", "generate"]

log = logging.getLogger("layerswarm.entry")

RETRY_AFTER_S = 1
FIRST_DELAY_S, MAX_DELAY_S = 0.05, 1.0  # backoff while no route is left
NO_ROOM = ("cache_full", "busy", "too_large")  # healthy peers without room: avoided, not banned


class NoRoom(Overloaded):
    """No route had room for a request before its first token (its peers answered cache_full or
    busy): refused at once, never after a backoff, so that the entry's admission can queue it
    again (peers/entry/admission.py)."""


@dataclass(frozen=True)
class Checks:
    """What checked generation (peers/entry/consensus.py) asks of generate(): `history` continues
    sequences already generated (the first step replays them); routes avoid the peers in `avoid`
    where the swarm allows (always, with `strict_avoid`); with `observe` every hop commits to its
    output and observe(Observed) sees each step that makes tokens before they are yielded;
    `shadowed` has each hop that has another replica recomputed by one (its shadow) with chance
    routes.check_rate, drawn for each hop when a route opens (again after a failover), whose
    commitments come back in result.shadows; each hop learns only whether it feeds a shadow."""

    history: list[list[int]] | None = None
    avoid: frozenset[str] = frozenset()
    strict_avoid: bool = False
    observe: Callable[[Observed], None] | None = None
    shadowed: bool = False


class Failover:
    """One request's retries: routes around banned peers and peers without room (and, where the
    swarm allows, around the peers of wrong-answer claims), backs off while no route is left,
    gives up after failover_timeout_s of failing."""

    def __init__(self, node: EntryPeer, reputation: Reputation, key: str, checks: Checks):
        self.node, self.reputation, self.key, self.checks = node, reputation, key, checks
        self.since: float | None = None  # failing since (monotonic)
        self.delay_s = FIRST_DELAY_S
        self.full: dict[str, str] = {}  # peers with no room for this request now -> why
        self.too_large: dict[str, str] = {}  # peers this request can never fit -> why
        self.reuse = node.config.prefix_reuse  # off once a peer could not rebuild a reused prefix
        self.suspects: set[str] = set()  # the peers of wrong-answer claims met by this request

    def _exclude(self) -> set[str]:
        return self.reputation.banned_now() | set(self.full) | set(self.too_large)

    async def open(self, session: RouteSession, started: bool) -> bool:
        """Put `session` on a route; False where none is left yet (after a backoff: try again)."""
        node, key, checks = self.node, self.key, self.checks
        try:
            route = self._route()
        except NoRouteError as e:
            await self._no_route(str(e), started)
            return False
        exclude = self._exclude() | checks.avoid
        shadows = shadows_for(node, key, route, exclude, check_rate(node)) if checks.shadowed else ()
        session.open(route, shadows, seals_for(node, route, shadows))
        return True

    def _route(self) -> list:
        """A route around the excluded peers and `checks.avoid` (as asked), then around as many
        suspects (this request's and the reputation's) as the swarm still allows: never the only
        peer of a span."""
        node, key, checks = self.node, self.key, self.checks
        exclude = self._exclude()
        route = route_around(node, key, exclude, checks.avoid, checks.strict_avoid)
        suspects = (self.suspects | self.reputation.suspected()) - exclude
        on_route = {h.peer_id for h in route}
        if not suspects & on_route:
            return route
        exclude |= checks.avoid - on_route  # (what the first route avoided stays avoided)
        return route_around(node, key, exclude, frozenset(suspects), False)

    async def _no_route(self, why: str, started: bool) -> None:
        if self.since is None:
            raise SwarmUnavailable(why) from None
        if self.too_large:  # no peer that could serve these layers can ever hold it
            raise SwarmUnavailable(
                f"no room for this request: {next(iter(self.too_large.values()))}"
            ) from None
        if self.full and not started:  # healthy peers without room now: come back later
            raise NoRoom(
                f"no room for this request: {next(iter(self.full.values()))}", RETRY_AFTER_S
            ) from None
        self._give_up_if_late(why)
        await asyncio.sleep(self.delay_s)
        self.delay_s = min(MAX_DELAY_S, self.delay_s * 2)
        self.full.clear()  # room may have freed up meanwhile

    def failed(self, e: HopFailed, session: RouteSession) -> None:
        """A step of `session` failed: account it, leave the route (the next step replays)."""
        self.since = self.since or time.monotonic()
        claim = self._claim(e, session)
        banned_s = None if claim else self.reputation.on_request_failure(e.peer_id, e.reason, e.message)
        if claim is not None and claim.kind == WRONG_ANSWER:
            log.info(
                "%s (reported by %s); routing around both where the swarm allows", e.message, claim.reporter
            )
        elif claim is not None:
            log.info("%s (reported by %s); checking it before anyone is banned", e.message, claim.reporter)
        elif banned_s is not None:
            log.warning("%s; banned for %.1f s, re-routing", e.message, banned_s)
        elif e.reason in NO_ROOM:
            (self.too_large if e.reason == "too_large" else self.full)[e.peer_id] = e.message
            log.info("%s; re-routing around it", e.message)
        elif e.reason == "bad_request":
            raise SwarmError(f"a peer refused this entry's step: {e.message}")
        else:  # a lost session is simply replayed
            log.info("%s; replaying", e.message)
        self.node.spawn(self.node.close_sessions(*session.drop()))
        self._give_up_if_late(e.message)
        if e.reason == "session_lost":
            self.reuse = False  # a peer could not rebuild a reused prefix: compute it in full

    def _claim(self, e: HopFailed, session: RouteSession) -> Claim | None:
        """`e` as a claim, its check started: a failure at fault that a peer reports of another
        (None where the failed peer reports itself, or this entry saw it fail)."""
        table = self.node.table
        reporter = reporter_of(e, session.session_id, lambda p: (r := table.get(p)) and r.public_key)
        if e.reason != AT_FAULT or reporter in (None, self.node.peer_id, e.peer_id):
            return None
        claim = Claim(reporter, e.peer_id, e.reason, e.message, e.claim)
        if claim.kind == WRONG_ANSWER:  # alive by construction: no check settles it
            self.suspects |= {reporter, e.peer_id} - {""}
            self.reputation.on_wrong_answer(claim)
        elif self.reputation.on_claim(claim):
            self.node.spawn(check_claim(self.node, claim))
        return claim

    def succeeded(self, session: RouteSession) -> None:
        """A step went through: a failover, if any, is over."""
        if self.since is None:
            return
        log.info("failover done: continuing on %s", " -> ".join(h.peer_id for h in session.route or []))
        self.reputation.on_request_success(h.peer_id for h in session.route or [])
        self.since, self.delay_s = None, FIRST_DELAY_S

    def _give_up_if_late(self, why: str) -> None:
        timeout_s = self.node.config.failover_timeout_s
        if self.since is not None and time.monotonic() - self.since > timeout_s:
            raise SwarmUnavailable(f"gave up after {timeout_s:.0f} s of failover: {why}")


async def check_claim(node: EntryPeer, claim: Claim) -> None:
    """Ask the peer a claim names, at its address in this entry's table, whether it answers: if
    not, it failed indeed and is banned; if it does, the claim is false and its reporter is the
    one avoided (peers/swarm/reputation.py), except a STALLED one (a step without an answer in
    time: either peer may have held it up), which counts as a wrong-answer claim. Both are routed
    around meanwhile."""
    named = node.table.get(claim.named)
    answers = named is not None and await node.forwarder.answers(named.address)
    if answers and claim.kind == STALLED:  # alive, yet the step got no answer: who held it up is open
        node.reputation.claim_unsettled(claim)
        return
    _, seconds = node.reputation.claim_settled(claim, held_up=not answers)
    if not answers:
        log.warning(
            "%s (reported by %s; it does not answer); banned for %.1f s",
            claim.message,
            claim.reporter,
            seconds,
        )


class Stepper:
    """The steps of one generation on its RouteSession: what each sends, and what its result
    adds to the sequences (typed: an Ask out, token groups back)."""

    def __init__(
        self,
        node: EntryPeer,
        prompt_ids: list[int],
        generated: list[list[int]],
        max_tokens: int,
        sampling: Sampling,
        stop_ids: frozenset[int],
        checks: Checks,
    ):
        self.node, self.max_tokens, self.sampling, self.stop_ids = node, max_tokens, sampling, stop_ids
        self.session, self.checks = RouteSession(prompt_ids, generated), checks
        self.finished = [any(t in stop_ids for t in g) for g in generated]
        self.state: SteerState | None = None
        self.speculation: Speculation | None = None
        self.prefill = Prefill()  # what the prefill tells the caller

    def steer(self, steering: Steering | None) -> None:
        """Send `steering`'s controls with each step that samples."""
        if steering is not None:
            self.state = steering.start(self.session.generated)

    def speculate(self) -> None:
        """Draft tokens for the chain to check (one sequence, unchecked)."""
        node, s = self.node, self.session
        context = s.prompt_ids + s.generated[0]
        self.speculation = Speculation(
            context, node.draft_block, node.scheduler, node.speculation, node.spawn
        )

    @property
    def done(self) -> bool:
        return all(self.finished) or len(self.session.generated[0]) >= self.max_tokens

    async def ask(self, reuse: bool) -> Ask:
        """The next step: a replay, a decode step, or a drafted one."""
        s = self.session
        rebuild = s.next_rebuild()
        score = self.prefill.wanted(s.prompt_ids, rebuild.rows) if s.position == 0 else None
        # (a checked step reuses prefixes as any other: a shadow restores what it holds of the
        # prompt and computes the rest, and one that cannot continue there leaves the step
        # unchecked; a scored one computes every position)
        prefix = prefix_hashes(s.prompt_ids) if reuse and s.position == 0 and score is None else ()
        checked = self.checks.observe is not None or uniform_steps(self.node)
        verify = context_digest(s.prompt_ids, s.generated) if checked else ""
        controls = ()
        if self.speculation is not None and s.position > 0:  # a decode step: the chain checks drafts too
            room = min(self.max_tokens - len(s.generated[0]), self.node.context_length - s.position) - 1
            draft = await self.speculation.propose(room)
            if self.state is not None:
                steered = self.state.drafted(s.generated[0], draft)
                draft, controls = steered.draft, steered.controls
            return Ask([rebuild.rows[0] + draft], prefix, verify, len(draft), controls)
        if self.state is not None and not rebuild.widens and len(s.pending) <= 1:  # tokens kept
            controls = self.state.controls(s.generated)
        return Ask(rebuild.rows, prefix, verify, 0, controls, score)

    async def send(self, ask: Ask) -> StepResult:
        result = await step(self.node, self.session, ask, self.sampling)
        why = self.state.violation(ask.controls, result.tokens) if ask.controls else None
        if why:  # a token that breaks what was sent is the last peer's fault
            raise HopFailed(self.session.route[-1].peer_id, why)
        return result

    def received(self, ask: Ask, result: StepResult) -> Iterator[list[Token]]:
        """The token groups a step's result gives the caller, each taken just before it is given."""
        s = self.session
        if ask.draft:  # the drafts kept and the model's own next token, one at a time
            kept = self.speculation.accepted(ask.rows[0][-ask.draft :], result.tokens)
            s.sent(kept + 1)  # the next step starts there: the peers drop the rest
            for tok in tokens_of(result)[: kept + 1]:
                self._take(0, tok)
                self.speculation.extend([tok.token])
                yield [tok]
                if self.done:
                    return
            return
        if ask.prefix and result.computed_from is not None:  # (a prefill: s.position is 0)
            self.prefill.cached_tokens = min(max(result.computed_from - s.position, 0), len(ask.rows[0]) - 1)
        s.sent(len(ask.rows[0]))
        if ask.score is not None:
            self.prefill.positions = result.prompt
        if s.pending:  # a replay goes on (the prompt's last token is next, sent to every sequence)
            return
        tokens = tokens_of(result)
        if len(tokens) != s.n:
            raise SwarmError(f"the last peer sampled {len(tokens)} sequences, {s.n} were asked for")
        for i, tok in enumerate(tokens):
            self._take(i, tok)
        if self.speculation is not None:
            self.speculation.extend([tokens[0].token])
        if self.checks.observe is not None:
            self.checks.observe(Observed(s.route, result))
        yield tokens

    def _take(self, i: int, tok: Token) -> None:
        self.session.take(i, tok.token)
        if self.state is not None:
            self.state.advance(i, tok.token)
        self.finished[i] = self.finished[i] or tok.token in self.stop_ids


async def generate(
    node: EntryPeer,
    prompt_ids: list[int],
    max_tokens: int,
    sampling: Sampling,
    stop_ids: frozenset[int],
    n: int = 1,
    *,
    speculative: bool = False,
    steering: Steering | None = None,
    checks: Checks | None = None,
    prefill: Prefill | None = None,
) -> AsyncIterator[list[Token]]:
    """Yield the next token of each of `n` sequences of one prompt, step by step, until every
    sequence met a stop id or max_tokens; survives failing peers until failover_timeout_s.

    `speculative`: one sequence, unchecked, drafts tokens by prompt lookup and has the chain
    check them in one step (peers/entry/speculative.py); the tokens are the same as without it,
    and they are yielded one at a time, so that a consumer stopping at a stop string never sees
    past it. `steering`: penalties, min_tokens and a grammar, sent with each step that samples.
    `checks`: for checked generation (see Checks). `prefill`: what the prefill tells, set before
    the first token is yielded (prompt logprobs where it asks for them: no prefix reused then)."""
    checks = checks or Checks()
    generated = [list(h) for h in checks.history] if checks.history else [[] for _ in range(n)]
    if generated[0] and all(any(t in stop_ids for t in g) for g in generated):
        return
    if uniform_steps(node):  # (as a checked request's: no hop tells the checked ones)
        sampling = seeded(sampling)
    run = Stepper(node, prompt_ids, generated, max_tokens, sampling, stop_ids, checks)
    run.steer(steering)
    run.prefill = prefill or run.prefill
    if speculative and n == 1 and checks.observe is None and not (checks.shadowed or uniform_steps(node)):
        run.speculate()
    session = run.session
    failover = Failover(node, node.reputation, routing_key(prompt_ids), checks)
    try:
        while len(session.generated[0]) < max_tokens:
            if node.stopping:
                raise SwarmUnavailable("this peer is shutting down; the request was cut short")
            if session.route is None and not await failover.open(session, bool(session.generated[0])):
                continue
            ask = await run.ask(failover.reuse)
            try:
                result = await run.send(ask)
            except HopFailed as e:
                failover.failed(e, session)
                continue
            failover.succeeded(session)
            for tokens in run.received(ask, result):
                yield tokens
                if run.done:
                    return
    finally:
        if session.route is not None:
            node.spawn(node.close_sessions(session.session_id, session.hops))
        if run.speculation is not None:
            run.speculation.close()
