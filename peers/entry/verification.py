"""Verified generation (`--verify-rate R`): each hop that has another replica is drawn with chance R
(every one, where the entry's rate is 0) and recomputed by it (its shadow) at every step, on the
same input; a token reaches the user only once each shadow's commitment agrees with its hop's
(else the referee decides, peers/entry/referee.py)."""

from collections.abc import AsyncIterator

from peers.entry.peer import EntryPeer
from peers.entry.referee import Dispute, referee_shadows
from peers.entry.runner import Request, Runner, plain_greedy, true_tokens
from peers.entry.selfcheck import SelfCheck
from peers.entry.session import Token
from peers.entry.steering import Steering
from peers.entry.step import seeded
from peers.swarm.commitments import agree
from peers.transport.frames import Sampling
from peers.transport.results import StepResult


def disputes_of(result: StepResult) -> list[Dispute]:
    """The hops whose shadow committed to another output on the same input."""
    by_span = {(c.start, c.end): c for c in result.commitments}
    return [
        Dispute(by_span[(s.start, s.end)], s)
        for s in result.shadows
        if (s.start, s.end) in by_span and not agree(by_span[(s.start, s.end)], s)
    ]


async def verified_generate(
    node: EntryPeer,
    prompt_ids: list[int],
    max_tokens: int,
    sampling: Sampling,
    stop_ids: frozenset[int],
    n: int = 1,
    steering: Steering | None = None,
) -> AsyncIterator[list[Token]]:
    """generate(), each hop with another replica drawn at routes.check_rate and recomputed by it
    on the same input (its shadow, fed by the hop before, told by a seal only it opens) at every
    step, and lone hops by this entry (--self-referee, peers/entry/selfcheck.py); a token is
    yielded only when each check agrees. On a disagreement a referee decides; the peer it
    contradicts is convicted, and generation goes on from the agreed tokens on a new route."""
    request = Request(prompt_ids, max_tokens, seeded(sampling), stop_ids, n, steering)
    greedy = plain_greedy(request.sampling, steering)
    history: list[list[int]] = [[] for _ in range(n)]
    stats = node.verification
    stats.requests += 1

    def start(avoid: frozenset[str] = frozenset(), shadowed: bool = True) -> Runner:
        return Runner(node, request, history, avoid, bool(avoid), shadowed)

    runner: Runner | None = None
    own = SelfCheck(node)  # --self-referee: lone spans recomputed here
    try:
        while True:
            runner = runner or start()  # (a new one: around the convicted, from the agreed tokens on)
            tokens = await runner.next()
            if tokens is None:
                return
            route, result = runner.route, runner.result
            stats.steps += 1
            if not result.shadows and not own.hops(route):
                stats.unchecked_steps += 1
            if greedy and not true_tokens(node, route, result, tokens):
                await runner.close()  # its last peer convicted itself: this step again, elsewhere
                runner = None
                continue
            disputes = disputes_of(result)
            if disputes:
                stats.disagreements += 1
                decided = await referee_shadows(
                    node, disputes, tokens, start, [prompt_ids + h for h in history]
                )
                await runner.close()
                runner = None
                if decided is None:  # this step again, on a route without the convicted
                    continue
                tokens = decided
            if not await own.check(route, result, [prompt_ids + h for h in history]):
                await runner.close()  # a lone hop convicted: this step again, without it
                runner = None
                continue
            for seq, tok in zip(history, tokens, strict=True):
                seq.append(tok.token)
            yield tokens
    finally:
        if runner is not None:
            await runner.close()
