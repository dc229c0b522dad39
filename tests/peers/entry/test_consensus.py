"""Consensus' and the referee's decisions, on fake routes and commitments: the majority decides
only when its votes are its own, a referee decides between two, the one peer a disagreement pins
is convicted with the evidence, and a hop's shadow is judged by a referee route or the entry."""

import asyncio

import pytest

from peers.entry.consensus import checked_generate, decide, group_by_step
from peers.entry.referee import Dispute, referee_shadows
from peers.entry.runner import Comparison, same_step, suspects
from peers.entry.session import Token
from peers.swarm.commitments import Commitment
from peers.transport.errors import SwarmUnavailable
from peers.transport.frames import Hop, Sampling
from peers.transport.results import StepResult
from tests.peers.entry.fakes import FakeEntry, FakeSwarm, reference

HONEST = (4.0, 3.0, 2.0, 1.0)  # a boundary's committed top values, token 0 the argmax
WRONG = (1.0, 2.0, 3.0, 4.0)  # a liar's (token 3 the argmax)


def commit(peer: str, start: int, end: int, values=HONEST) -> Commitment:
    return Commitment(peer, start, end, 1, "ctx", "float32", ((0, 1, 2, 3),), (values,))


class FakeRunner:
    """A route's step as consensus sees it: two hops, 0:2 and 2:4, and what each committed to."""

    def __init__(self, first: str, last: str, wrong: bool = False):
        values = WRONG if wrong else HONEST
        self.route = [Hop(first, f"{first}:1", 0, 2), Hop(last, f"{last}:1", 2, 4)]
        commitments = (commit(first, 0, 2, values), commit(last, 2, 4, values))
        token = 3 if wrong else 0
        self.result = StepResult([token], [0.0], commitments=commitments)
        self.tokens = [Token(token, 0.0)]
        self.closed = False

    @property
    def ids(self) -> list[int]:
        return [t.token for t in self.tokens]

    async def next(self):
        return self.tokens

    async def close(self) -> None:
        self.closed = True


class Starts:
    """A `start` for the referee: records what it was asked to avoid, returns `runner`."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __call__(self, avoid, strict=False, shadowed=True):
        self.calls.append((set(avoid), strict))
        return self.runner


def test_steps_compare_by_their_first_disagreeing_layers():
    honest, liar = FakeRunner("a", "c"), FakeRunner("b", "d", wrong=True)
    assert same_step(honest.result, FakeRunner("e", "f").result, greedy=True) == Comparison(True)
    where = same_step(honest.result, liar.result, greedy=True)
    assert where == Comparison(False, 0, 2)
    assert [h.peer_id for h in suspects(liar.route, honest.route, where)] == ["b"]
    assert group_by_step([honest, liar, FakeRunner("e", "f")], greedy=True) == [[0, 2], [1]]


def test_a_majority_of_independent_routes_convicts_the_minority_s_peer():
    entry = FakeEntry(FakeSwarm({}))
    runners = [FakeRunner("a", "c"), FakeRunner("b", "d", wrong=True), FakeRunner("e", "f")]
    kept = asyncio.run(decide(entry, runners, [[0, 2], [1]], Starts(None), greedy=True))
    assert kept == [runners[0], runners[2]] and runners[1].closed
    [(peer, why, evidence)] = entry.convictions
    assert (peer, why) == ("b", "its layers 0:2 disagreed with 2 other routes")
    assert [c.peer_id for c in evidence] == ["b", "a"]  # its own commitment and another peer's


def test_between_two_routes_a_referee_route_avoiding_the_suspects_decides():
    entry = FakeEntry(FakeSwarm({}))
    runners = [FakeRunner("a", "c"), FakeRunner("b", "c", wrong=True)]
    runners[1].result = StepResult(
        [3], [0.0], commitments=(commit("b", 0, 2, WRONG), commit("c", 2, 4, WRONG))
    )
    referee = FakeRunner("e", "f")
    starts = Starts(referee)
    kept = asyncio.run(decide(entry, runners, [[0], [1]], starts, greedy=True))
    assert starts.calls == [({"a", "b"}, True)]
    assert kept == [runners[0], referee] and runners[1].closed
    assert [(p, w) for p, w, _ in entry.convictions] == [
        ("b", "its layers 0:2 disagreed with 2 other routes")
    ]


def test_routes_sharing_a_liar_do_not_outvote_an_honest_one():
    entry = FakeEntry(FakeSwarm({}))
    runners = [FakeRunner("a", "c", wrong=True), FakeRunner("a", "d", wrong=True), FakeRunner("b", "e")]
    starts = Starts(FakeRunner("g", "h"))
    kept = asyncio.run(decide(entry, runners, [[0, 1], [2]], starts, greedy=True))
    assert starts.calls, "the majority shares peer a where it disagrees: a referee decides"
    assert kept[0] is runners[2] and runners[0].closed and runners[1].closed
    assert {p for p, _, _ in entry.convictions} == {"a"}


def test_a_referee_that_sides_with_nobody_fails_the_request():
    entry = FakeEntry(FakeSwarm({}))
    runners = [FakeRunner("a", "c"), FakeRunner("b", "d", wrong=True)]
    odd = FakeRunner("e", "f")
    odd.result = StepResult([1], [0.0], commitments=(commit("e", 0, 2, (9.0, 1.0, 1.0, 1.0)),))
    with pytest.raises(SwarmUnavailable, match="three routes computed three different steps"):
        asyncio.run(decide(entry, runners, [[0], [1]], Starts(odd), greedy=True))
    assert odd.closed and entry.convictions == []


@pytest.mark.parametrize("shadow_lies", [True, False])
def test_a_referee_route_judges_a_hop_and_its_shadow(shadow_lies):
    entry = FakeEntry(FakeSwarm({}))
    hop, shadow = commit("a", 0, 2), commit("b", 0, 2, WRONG)
    if not shadow_lies:
        hop, shadow = commit("a", 0, 2, WRONG), commit("b", 0, 2)
    referee, tokens = FakeRunner("e", "f"), [Token(0 if shadow_lies else 3, 0.0)]  # the route's
    starts = Starts(referee)
    decided = asyncio.run(referee_shadows(entry, [Dispute(hop, shadow)], tokens, starts, [[1, 2]]))
    assert starts.calls == [({"a", "b"}, False)] and referee.closed
    liar = "b" if shadow_lies else "a"
    assert [(p, w) for p, w, _ in entry.convictions] == [
        (liar, f"its layers 0:2 disagreed with {'ab'.replace(liar, '')} and a referee route")
    ]
    assert decided == (tokens if shadow_lies else referee.tokens)  # the referee's where the hop lied


def test_with_self_referee_and_no_other_replica_the_entry_judges():
    entry = FakeEntry(FakeSwarm({}), self_referee=True)
    judged = []

    async def judge(rows, end):
        judged.append((rows, end))
        return commit("entry", 0, end)

    entry.judge = judge

    class NoRoute(FakeRunner):
        async def next(self):
            raise SwarmUnavailable("no route")

    dispute = Dispute(commit("a", 0, 2, WRONG), commit("b", 0, 2))
    decided = asyncio.run(
        referee_shadows(entry, [dispute], [Token(3, 0.0)], Starts(NoRoute("x", "y")), [[1, 2]])
    )
    assert judged == [([[1, 2]], 2)]
    assert entry.convictions == [
        (
            "a",
            "its layers 0:2 disagreed with b and this entry's own computation",
            (dispute.hop, dispute.shadow),
        )
    ]
    assert decided is None  # the hop on the route lost: the step is computed again


def test_without_self_referee_an_undecidable_dispute_fails():
    class NoRoute(FakeRunner):
        async def next(self):
            raise SwarmUnavailable("no route")

    dispute = Dispute(commit("a", 0, 2, WRONG), commit("b", 0, 2))
    with pytest.raises(SwarmUnavailable, match="peers a, b disagree and no other replica"):
        asyncio.run(referee_shadows(FakeEntry(FakeSwarm({})), [dispute], [], Starts(NoRoute("x", "y")), []))


def test_consensus_without_another_replica_runs_unchecked():
    entry = FakeEntry(FakeSwarm({"a": (0, 2), "c": (2, 4)}))

    async def main():
        return [
            s[0].token
            async for s in checked_generate(entry, [5, 6, 7], 6, Sampling(temperature=0), frozenset())
        ]

    assert asyncio.run(main()) == reference([5, 6, 7], 6)
    assert entry.verification.unverifiable == 1 and entry.verification.requests == 0
    with pytest.raises(ValueError, match="checked generation takes 2 to 5 routes, got 6"):
        asyncio.run(anext(checked_generate(entry, [5], 1, Sampling(temperature=0), frozenset(), routes=6)))
