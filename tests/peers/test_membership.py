"""The swarm table: merge rules, suspicion, death, tombstones, refutation, new lives."""

import random
from dataclasses import replace

import pytest

from peers.membership import DEAD, JOINING, SERVING, GossipSettings, PeerEntry, Table, supersedes
from tests.helpers import FakeClock

S = GossipSettings(interval_s=1, suspect_after_s=3, dead_after_s=6, tombstone_s=30)


def entry(pid="b:1", inc=1, hb=1, state=SERVING) -> PeerEntry:
    return PeerEntry(pid, "m", 4, 0, 4, state, inc, hb, 0)


def table(clock, pid="a:1") -> Table:
    return Table(entry(pid, inc=1, hb=0, state=JOINING), S, clock)


def test_supersedes_orders_lives_then_heartbeats_and_death_is_final():
    assert supersedes(entry(hb=2), entry(hb=1))
    assert not supersedes(entry(hb=1), entry(hb=2))
    assert supersedes(entry(inc=2, hb=0), entry(inc=1, hb=99))
    assert supersedes(entry(hb=1, state=DEAD), entry(hb=5))
    assert not supersedes(entry(hb=9), entry(hb=1, state=DEAD))  # stale gossip cannot revive


def test_silent_peer_becomes_suspect_then_dead_then_forgotten():
    clock = FakeClock(100.0)
    t = table(clock)
    t.merge([entry()])
    t.vouch("b:1", 1)
    assert t.status("b:1") == SERVING and [e.peer_id for e in t.serving("m")] == ["b:1"]
    clock.now += 4
    assert t.status("b:1") == "suspect" and t.serving("m") == []
    clock.now += 3
    assert t.sweep() == ["b:1"] and t.status("b:1") == DEAD
    t.merge([entry(hb=1)])  # stale gossip of the dead life
    assert t.status("b:1") == DEAD
    clock.now += 31
    t.sweep()
    assert t.status("b:1") is None


def test_heartbeat_refutes_suspicion_and_failure_reports_speed_it_up():
    clock = FakeClock(100.0)
    t = table(clock)
    t.merge([entry(hb=1)])
    clock.now += 4
    t.merge([entry(hb=2)])
    assert t.status("b:1") == SERVING
    t.report_failure("b:1")
    assert t.status("b:1") == "suspect"
    clock.now += 3.5
    assert t.sweep() == ["b:1"]


def test_restarted_peer_is_one_new_life():
    clock = FakeClock(100.0)
    t = table(clock)
    t.merge([entry(inc=1, hb=5)])
    clock.now += 7
    t.sweep()
    t.merge([entry(inc=2, hb=0)])  # same address, new process
    assert t.status("b:1") == SERVING
    assert [e.incarnation for e in t.entries() if e.peer_id == "b:1"] == [2]


def test_a_forged_version_of_a_peer_is_refuted_by_the_peer():
    t = table(FakeClock(100.0))
    me = t.me
    t.merge([replace(me, start=0, end=4, state=SERVING, heartbeat=me.heartbeat + 50)])  # moved, forged
    assert t.me.incarnation > me.incarnation and (t.me.start, t.me.end) == (me.start, me.end)
    again = t.me
    t.merge([replace(again, heartbeat=again.heartbeat - 1 if again.heartbeat else 0)])  # stale: no change
    assert t.me == again


def test_peer_told_it_is_dead_starts_a_new_life():
    clock = FakeClock(100.0)
    t = table(clock)
    old = t.me.incarnation
    t.merge([PeerEntry("a:1", "m", 4, 0, 4, DEAD, old, 3, 0)])
    assert t.me.incarnation > old and t.me.state == JOINING


def test_own_changes_advance_the_heartbeat():
    t = table(FakeClock(100.0))
    hb = t.me.heartbeat
    t.update_me(state=SERVING)
    assert t.me.heartbeat == hb + 1


def test_gossip_targets_are_live_peers_or_seeds():
    clock = FakeClock(100.0)
    t = table(clock)
    assert t.gossip_targets(["s:1", "a:1"]) == ["s:1"]
    t.merge([entry(f"p:{i}") for i in range(10)])
    picked = t.gossip_targets([], random.Random(0))  # fanout, plus one peer not yet dialled
    assert len(picked) == S.fanout + 1 and "a:1" not in picked and len(set(picked)) == len(picked)
    for i in range(10):
        t.vouch(f"p:{i}", 1)
    assert len(t.gossip_targets([], random.Random(0))) == S.fanout
    with_seed = t.gossip_targets(["p:1", "down:1"], random.Random(0))  # a seed not yet reached
    assert len(with_seed) == S.fanout + 1 and with_seed[-1] == "down:1"


@pytest.mark.parametrize("bad", [dict(interval_s=0), dict(fanout=0), dict(suspect_after_s=0.5, interval_s=1)])
def test_settings_are_validated(bad):
    with pytest.raises(ValueError):
        GossipSettings(**bad)


def test_tombstones_keep_their_age_and_expire_everywhere():
    clock = FakeClock(100.0)
    a, b = table(clock, "a:1"), table(clock, "b:1")
    for t in (a, b):
        t.merge([entry("c:1")])
    clock.now += 7
    a.sweep()  # a declares c dead; b has not yet
    b.merge(a.entries())
    assert b.status("c:1") == DEAD
    for _ in range(40):  # they keep gossiping; the tombstone must not be renewed by the exchange
        clock.now += 1
        a.sweep(), b.sweep()
        a.merge(b.entries())
        b.merge(a.entries())
    assert a.status("c:1") is None and b.status("c:1") is None


def test_rebalance_moves_only_a_redundant_larger_id_peer_into_a_gap():
    from peers.layer_choice import rebalance_target

    def span(pid, start, end):
        return PeerEntry(pid, "m", 4, start, end, SERVING, 1, 1, 0)

    clock = FakeClock(100.0)
    low = Table(span("a:1", 0, 2), S, clock)
    high = Table(span("b:1", 0, 2), S, clock)
    low.merge([span("b:1", 0, 2)])
    high.merge([span("a:1", 0, 2)])
    low.vouch("b:1", 1)
    high.vouch("a:1", 1)
    assert rebalance_target(high, "m", 4) == (2, 4)  # layers 2-3 unserved; a:1 keeps 0-1 served
    assert rebalance_target(low, "m", 4) is None  # the smallest id never moves
    high.merge([span("c:1", 2, 4)])
    high.vouch("c:1", 1)
    assert rebalance_target(high, "m", 4) is None  # no gap: stay


def test_only_peers_that_answered_at_their_address_are_routed_to():
    """A peer only heard of (e.g. a fake entry gossiped for a silent port), or a forged new life
    of a live address, is not served until it answers this peer as that life."""
    clock = FakeClock(100.0)
    t = table(clock)
    t.merge([entry()])
    assert t.status("b:1") == SERVING and t.serving("m") == []
    assert "b:1" in t.gossip_targets([], random.Random(0))  # dialled next round
    t.vouch("b:1", 1)
    t.merge([entry(hb=2)])  # its heartbeats keep it vouched
    assert [e.peer_id for e in t.serving("m")] == ["b:1"]
    t.merge([entry(inc=2, hb=0)])  # a new life, unconfirmed (a restart, or forged)
    assert t.serving("m") == []
    t.vouch("b:1", 2)
    assert [e.peer_id for e in t.serving("m")] == ["b:1"]
