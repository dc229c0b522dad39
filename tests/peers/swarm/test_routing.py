"""Route planning is pure: tiling, fewest hops, rendezvous balance, bounded load, minimal moves."""

from collections import Counter
from dataclasses import replace

import pytest

from peers.swarm.membership import SERVING, PeerRecord
from peers.swarm.routing import (
    NoRouteError,
    alone,
    coverage,
    gaps,
    plan_route,
    unchecked_from,
    unchecked_hops,
)

TOTAL = 30


def peer(name: str, start: int, end: int, load: int = 0) -> PeerRecord:
    return PeerRecord(name, "m", TOTAL, start, end, SERVING, 1, 1, load)


def spans(route):
    return [(h.peer_id, h.start, h.end) for h in route]


def test_route_tiles_all_layers_in_order():
    peers = [peer("c", 20, 30), peer("a", 0, 10), peer("b", 10, 20)]
    assert spans(plan_route(peers, TOTAL, "k")) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_fewest_hops_win_and_overlaps_are_cut():
    peers = [peer("a", 0, 10), peer("b", 10, 20), peer("c", 20, 30), peer("whole", 0, 30)]
    assert spans(plan_route(peers, TOTAL, "k")) == [("whole", 0, 30)]
    overlapping = [peer("x", 0, 15), peer("y", 10, 30)]
    assert spans(plan_route(overlapping, TOTAL, "k")) == [("x", 0, 15), ("y", 15, 30)]


def test_missing_layers_are_named():
    with pytest.raises(NoRouteError, match="no peer serves layers 10-19"):
        plan_route([peer("a", 0, 10), peer("c", 20, 30)], TOTAL, "k", "m")
    with pytest.raises(NoRouteError, match="no peer serves layer 29"):
        plan_route([peer("a", 0, 29)], TOTAL, "k", "m")
    assert gaps(coverage([peer("a", 0, 10), peer("c", 20, 25)], TOTAL)) == [(10, 20), (25, 30)]


def test_excluded_peers_are_avoided():
    peers = [peer("a1", 0, 30), peer("a2", 0, 30)]
    for key in map(str, range(50)):
        assert plan_route(peers, TOTAL, key, exclude={"a1"})[0].peer_id == "a2"


def test_rendezvous_balance_within_10_percent():
    peers = [peer(f"p{i}", 0, TOTAL) for i in range(4)]
    counts = Counter(plan_route(peers, TOTAL, f"session-{k}")[0].peer_id for k in range(20000))
    mean = 20000 / 4
    assert max(counts.values()) <= 1.1 * mean, counts


def test_membership_change_moves_only_the_leavers_sessions():
    peers = [peer(f"p{i}", 0, TOTAL) for i in range(5)]
    keys = [f"s{k}" for k in range(5000)]
    before = {k: plan_route(peers, TOTAL, k)[0].peer_id for k in keys}
    after = {k: plan_route(peers[:-1], TOTAL, k)[0].peer_id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "p4" for k in moved)  # only the leaver's sessions move
    assert 0.15 < len(moved) / len(keys) < 0.25  # about 1/N
    joined = {k: plan_route([*peers, peer("p5", 0, TOTAL)], TOTAL, k)[0].peer_id for k in keys}
    assert all(joined[k] in (before[k], "p5") for k in keys)


def test_overloaded_peer_is_skipped_while_another_can_serve():
    peers = [peer("busy", 0, TOTAL, load=10), peer("idle", 0, TOTAL, load=2)]
    assert {plan_route(peers, TOTAL, str(k))[0].peer_id for k in range(100)} == {"idle"}
    alone = [peer("busy", 0, TOTAL, load=10)]
    assert plan_route(alone, TOTAL, "k")[0].peer_id == "busy"


def test_one_session_more_is_no_imbalance():
    """Loads are whole sessions, published a heartbeat late: a replica still counted with the
    session that just ended keeps its keys (else every request after it goes to the other)."""
    peers = [peer("a", 0, TOTAL, load=1), peer("b", 0, TOTAL, load=0)]
    assert {plan_route(peers, TOTAL, str(k))[0].peer_id for k in range(100)} == {"a", "b"}
    peers = [peer("a", 0, TOTAL, load=3), peer("b", 0, TOTAL, load=0)]
    assert {plan_route(peers, TOTAL, str(k))[0].peer_id for k in range(100)} == {"b"}


def measured(name: str, start: int, end: int, layer_ms: float = 0.0, links=()) -> PeerRecord:
    return replace(peer(name, start, end), layer_ms=layer_ms, links=tuple(links))


def test_a_much_slower_replica_is_avoided_and_close_ones_keep_their_keys():
    keys = [f"k{i}" for i in range(200)]
    slow = [measured("a", 0, 30, 1.0), measured("b", 0, 30, 5.0)]  # b computes 5x slower
    assert {plan_route(slow, TOTAL, k)[0].peer_id for k in keys} == {"a"}
    close = [measured("a", 0, 30, 1.0), measured("b", 0, 30, 1.2)]  # within the margin: rendezvous
    unmeasured = [peer("a", 0, 30), peer("b", 0, 30)]
    assert [plan_route(close, TOTAL, k)[0].peer_id for k in keys] == [
        plan_route(unmeasured, TOTAL, k)[0].peer_id for k in keys
    ]
    new = [measured("a", 0, 30, 1.0), measured("b", 0, 30, 0.0)]  # b not measured yet: kept
    assert {plan_route(new, TOTAL, k)[0].peer_id for k in keys} == {"a", "b"}


def test_a_replica_behind_a_slow_link_from_the_previous_hop_is_avoided():
    far, near = "c" * 20, "d" * 20
    rest = [measured(far, 10, 30, links=[("a", 80.0)]), measured(near, 10, 30, links=[("a", 3.0)])]
    keys = [f"k{i}" for i in range(100)]
    assert {plan_route([measured("a", 0, 10)] + rest, TOTAL, k)[1].peer_id for k in keys} == {near}
    # one end cannot make a link look shorter than the other end sees it: the larger counts
    claims = [measured("a", 0, 10, links=[(far, 2.0)])]
    assert {plan_route(claims + rest, TOTAL, k)[1].peer_id for k in keys} == {near}
    # the first hop is timed by the planner's own measurement alone
    origin = measured("entry", 0, 0, links=[(far, 1.0), (near, 90.0)])
    whole = [measured(far, 0, 30), measured(near, 0, 30, links=[("entry", 0.5)])]
    assert {plan_route(whole, TOTAL, k, origin=origin)[0].peer_id for k in keys} == {far}


def test_open_swarm_routes_do_not_prefer_a_long_unchecked_hop():
    """A stranger announcing 0:30 where only 0:10 and 10:20 are served otherwise: by fewest hops it
    takes the whole route, none of it checkable; checkable first, it runs only 20:30 (the
    layers nobody else serves) and the rest goes to peers others can check."""
    peers = [peer("a", 0, 10), peer("b", 10, 20), peer("long", 0, 30)]
    assert spans(plan_route(peers, TOTAL, "k")) == [("long", 0, 30)]
    checked = plan_route(peers, TOTAL, "k", checkable_first=True)
    assert spans(checked) == [("a", 0, 10), ("b", 10, 20), ("long", 20, 30)]
    assert [h.peer_id for h in unchecked_hops(peers, checked, TOTAL)] == ["long"]


def test_a_hop_a_chain_covers_is_checkable_and_keeps_fewest_hops():
    """A full-span joiner beside a 0:10, 10:20, 20:30 chain: every hop is checkable (the chain
    recomputes the joiner, the joiner each link), so fewest hops still wins."""
    peers = [peer("a", 0, 10), peer("b", 10, 20), peer("c", 20, 30), peer("whole", 0, 30)]
    route = plan_route(peers, TOTAL, "k", checkable_first=True)
    assert spans(route) == [("whole", 0, 30)]
    assert unchecked_hops(peers, route, TOTAL) == []
    chain = plan_route(peers, TOTAL, "k", exclude={"whole"}, checkable_first=True)
    assert unchecked_hops(peers, chain, TOTAL) == []
    assert unchecked_from(peers, coverage(peers, TOTAL)) == {"a": -1, "b": -1, "c": -1, "whole": -1}


def test_layers_one_peer_alone_serves_are_named():
    peers = [peer("a", 0, 10), peer("b", 10, 20), peer("c", 20, 30), peer("x", 5, 15)]
    assert alone(coverage(peers, TOTAL)) == [(0, 5), (15, 30)]
    assert alone(coverage([*peers, peer("whole", 0, 30)], TOTAL)) == []
