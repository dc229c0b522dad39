"""A RouteSession and the generation loop over a fake swarm (tests/peers/entry/fakes.py): the
tokens equal the fake model's, and a failing peer is banned, avoided or replayed around exactly
as its failure's reason says, with the tokens unchanged."""

import asyncio

import pytest

from peers.entry.generation import Checks, generate
from peers.entry.prefix import prefix_hashes
from peers.entry.session import Rebuild, RouteSession, replay_plan
from peers.entry.steering import Steering
from peers.transport.errors import Overloaded, SwarmError, SwarmUnavailable
from peers.transport.frames import Hop, Sampling
from tests.peers.entry.fakes import VOCAB, FakeEntry, FakeSwarm, next_token, reference

GREEDY = Sampling(temperature=0)
PROMPT = [5, 17, 9, 42, 7, 3]
REPLICATED = {"a": (0, 2), "b": (0, 2), "c": (2, 4)}  # two replicas of 0:2, one of 2:4


def run(entry, prompt=PROMPT, max_tokens=10, n=1, on_token=None, stop=frozenset(), **kw) -> list[list[int]]:
    """Every sequence's tokens; on_token(count, entry) after each step."""

    async def main():
        out = [[] for _ in range(n)]
        try:
            async for step in generate(entry, prompt, max_tokens, GREEDY, stop, n, **kw):
                for seq, tok in zip(out, step, strict=True):
                    seq.append(tok.token)
                if on_token:
                    on_token(len(out[0]))
        finally:
            await asyncio.gather(*entry.tasks)
        return out

    return asyncio.run(main())


def fail_first_hop_at(count: int, reason: str):
    """A token callback: at `count` tokens, the first peer of the route fails with `reason`."""

    def on_token(seen: int, swarm: FakeSwarm) -> None:
        if seen == count:
            swarm.fail[swarm.first_hop()] = reason

    return on_token


def test_replay_plans_rebuild_every_sequence():
    assert replay_plan([1, 2, 3], [[]], 1) == [Rebuild([[1, 2, 3]])]
    assert replay_plan([1, 2, 3], [[], []], 2) == [Rebuild([[1, 2]], widens=True), Rebuild([[3], [3]])]
    assert replay_plan([1], [[], []], 2) == [Rebuild([[1], [1]])]
    assert replay_plan([1, 2], [[4, 5], [6, 7]], 2) == [Rebuild([[1, 2, 4, 5], [1, 2, 6, 7]])]


def test_a_route_session_replays_its_history_on_a_new_route():
    session = RouteSession([1, 2], [[4, 5]])
    route = [Hop("a", "a:1", 0, 2), Hop("c", "c:1", 2, 4)]
    session.open(route, (Hop("b", "b:1", 0, 2),))
    session.sent(4)
    first = session.session_id
    assert session.position == 4 and session.next_rebuild() == Rebuild([[5]])
    closed_id, hops = session.drop()
    assert (closed_id, [h.peer_id for h in hops]) == (first, ["a", "c", "b"])
    assert session.route is None and session.session_id != first
    session.open(route)
    assert session.position == 0 and session.next_rebuild() == Rebuild([[1, 2, 4, 5]])


@pytest.mark.parametrize("n", [1, 3])
def test_tokens_equal_the_model_s(n):
    swarm = FakeSwarm(REPLICATED)
    got = run(FakeEntry(swarm), n=n)
    assert got == [reference(PROMPT, 10)] * n  # (the fake model is greedy: every sequence alike)
    widened = [s for s in swarm.steps if len(s.tensor) == n]
    assert swarm.steps[0].tensor.tolist() == ([PROMPT] if n == 1 else [PROMPT[:-1]])
    assert len(widened) == len(swarm.steps) - (n > 1)


def test_a_failed_peer_is_banned_and_the_history_replayed_on_its_replica():
    swarm = FakeSwarm(REPLICATED)
    entry = FakeEntry(swarm)
    on_token = fail_first_hop_at(4, "failed")
    got = run(entry, on_token=lambda seen: on_token(seen, swarm))
    failed = next(iter(swarm.fail))
    assert got == [reference(PROMPT, 10)]
    assert entry.bans.banned({}) == {failed} and entry.table.reported == [failed]
    assert entry.failovers == 1 and entry.metrics.failovers.counts == {"failed": 1}
    assert [(e["peer_id"], e["reason"]) for e in entry.failover_log] == [(failed, "failed")]
    replay = next(s for s in swarm.steps[5:] if s.position == 0)  # prompt + 4 tokens, one prefill
    assert replay.tensor.tolist() == [PROMPT + got[0][:4]]
    assert failed not in {h.peer_id for h in replay.hops}
    assert swarm.closed[0][1] == (failed, "c")  # the failed session is closed on its route


def test_a_lost_session_is_replayed_in_full_without_a_ban():
    swarm = FakeSwarm(REPLICATED)
    entry = FakeEntry(swarm, prefix_reuse=True)
    prompt = list(range(3, 43))  # over a block: the first step sends its prefix hashes
    on_token = fail_first_hop_at(3, "session_lost")

    def lose(seen):
        on_token(seen, swarm)
        if seen == 3:
            lost = swarm.first_hop()
            swarm.sessions = {k: v for k, v in swarm.sessions.items() if k[0] != lost}
            del swarm.fail[lost]  # it answers again, without the session

    got = run(entry, prompt, on_token=lose)
    assert got == [reference(prompt, 10)]
    assert entry.bans.banned({}) == set() and entry.failovers == 1
    starts = [s for s in swarm.steps if s.position == 0]
    assert [len(s.prefix) for s in starts] == [len(prefix_hashes(prompt)), 0]  # reuse is off after


def test_a_busy_peer_is_avoided_but_not_banned():
    swarm = FakeSwarm(REPLICATED)
    entry = FakeEntry(swarm)
    on_token = fail_first_hop_at(2, "busy")
    got = run(entry, on_token=lambda seen: on_token(seen, swarm))
    assert got == [reference(PROMPT, 10)]
    busy = next(iter(swarm.fail))
    assert entry.bans.banned({}) == set() and entry.table.reported == []
    assert entry.metrics.failovers.counts == {"busy": 1}
    assert all(busy not in {h.peer_id for h in s.hops} for s in swarm.steps[3:])


def test_no_room_anywhere_before_the_first_token_asks_to_retry_later():
    swarm = FakeSwarm(REPLICATED)
    swarm.fail.update(a="cache_full", b="cache_full")
    with pytest.raises(Overloaded, match="no room for this request: peer . failed: it said cache_full"):
        run(FakeEntry(swarm))


def test_a_request_too_large_for_every_replica_is_refused():
    swarm = FakeSwarm(REPLICATED)
    swarm.fail.update(a="too_large", b="too_large")
    with pytest.raises(SwarmUnavailable, match="no room for this request: peer . failed: it said too_large"):
        run(FakeEntry(swarm))


def test_a_refused_step_fails_the_request():
    swarm = FakeSwarm(REPLICATED)
    swarm.fail["c"] = "bad_request"
    with pytest.raises(SwarmError, match="a peer refused this entry's step: peer c failed"):
        run(FakeEntry(swarm))


def test_failover_gives_up_after_its_timeout():
    swarm = FakeSwarm({"a": (0, 4)})
    entry = FakeEntry(swarm, failover_timeout_s=0.3)
    swarm.fail["a"] = "failed"
    with pytest.raises(SwarmUnavailable, match="gave up after 0 s of failover"):
        run(entry)
    assert entry.failovers == 1  # banned at once: then no route until the timeout


def test_several_sequences_replay_each_own_history():
    swarm = FakeSwarm(REPLICATED)
    entry = FakeEntry(swarm)
    on_token = fail_first_hop_at(5, "failed")
    got = run(entry, n=2, on_token=lambda seen: on_token(seen, swarm))
    assert got == [reference(PROMPT, 10)] * 2
    replay = next(s for s in swarm.steps[3:] if s.position == 0)
    assert replay.tensor.tolist() == [PROMPT + got[0][:5]] * 2


def test_history_continues_and_stop_ids_end_a_sequence():
    swarm = FakeSwarm(REPLICATED)
    ref = reference(PROMPT, 10)
    got = run(FakeEntry(swarm), checks=Checks(history=[ref[:3]]))
    assert got == [ref[3:]]  # up to max_tokens in all
    assert swarm.steps[0].tensor.tolist() == [PROMPT + ref[:3]]
    assert run(FakeEntry(FakeSwarm(REPLICATED)), stop=frozenset({ref[2]})) == [ref[: ref.index(ref[2]) + 1]]
    assert next_token(PROMPT) == ref[0]


def test_routes_avoid_the_peers_asked_where_the_swarm_allows():
    swarm = FakeSwarm(REPLICATED)
    run(FakeEntry(swarm), checks=Checks(avoid=frozenset({"a", "c"})))
    assert {h.peer_id for s in swarm.steps for h in s.hops} == {"b", "c"}  # c has no other replica
    with pytest.raises(SwarmUnavailable):
        run(FakeEntry(FakeSwarm(REPLICATED)), checks=Checks(avoid=frozenset({"c"}), strict_avoid=True))


def test_a_token_that_breaks_the_steps_controls_fails_over_its_last_peer():
    swarm = FakeSwarm({"a": (0, 4), "b": (0, 4)})  # the fake peers ignore the controls sent
    entry = FakeEntry(swarm, failover_timeout_s=0.3)
    ref = reference(PROMPT, 3)
    steering = Steering(None, VOCAB, frozenset({ref[1]}), min_tokens=5)
    with pytest.raises(SwarmUnavailable, match="gave up after 0 s of failover"):
        run(entry, steering=steering)
    assert {e["peer_id"] for e in entry.failover_log} == {"a", "b"}
    assert all(
        e["message"].endswith(f"it sampled token {ref[1]}, which the step banned") for e in entry.failover_log
    )
    assert entry.bans.banned({}) == {"a", "b"}
