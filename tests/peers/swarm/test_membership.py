"""The swarm table: merge rules, signatures, suspicion, death, tombstones, new lives."""

import random
from collections import defaultdict
from dataclasses import replace

import pytest

from peers.swarm.identity import Identity
from peers.swarm.membership import (
    DEAD,
    JOINING,
    LEAVING,
    SERVING,
    UNVOUCHED_DIALS_PER_ROUND,
    GossipSettings,
    PeerRecord,
    Table,
    parse_entries,
    supersedes,
)
from tests.helpers import FakeClock

S = GossipSettings(interval_s=1, suspect_after_s=3, dead_after_s=6, tombstone_s=30)
IDS: dict[str, Identity] = defaultdict(Identity.generate)  # one identity per peer name


def pid(name: str) -> str:
    return IDS[name].peer_id


def entry(name="b", inc=1, hb=1, state=SERVING, start=0, end=4) -> PeerRecord:
    """The entry of peer `name` (at address name:1), signed by its owner."""
    return PeerRecord("", "m", 4, start, end, state, inc, hb, 0, address=f"{name}:1").signed(IDS[name])


def table(clock, name="a") -> Table:
    return Table(entry(name, inc=1, hb=0, state=JOINING), IDS[name], S, clock)


B = pid("b")


def test_supersedes_orders_lives_then_heartbeats_and_a_tombstone_is_final():
    assert supersedes(entry(hb=2), entry(hb=1))
    assert not supersedes(entry(hb=1), entry(hb=2))
    assert supersedes(entry(inc=2, hb=0), entry(inc=1, hb=99))
    assert supersedes(entry(hb=1, state=DEAD), entry(hb=5))
    assert not supersedes(entry(hb=9), entry(hb=1, state=DEAD))  # stale gossip cannot revive


def test_entries_round_trip_with_their_signature():
    e = entry()
    assert e.verify() and parse_entries([e.to_json()]) == [e]
    assert e.peer_id == B and e.address == "b:1"


@pytest.mark.parametrize(
    "forge",
    [
        lambda e: replace(e, address="evil:1", heartbeat=2),  # moved to another address
        lambda e: replace(e, start=2, heartbeat=2),  # another span
        lambda e: replace(e, heartbeat=e.heartbeat + 10**6),  # a version it never had
        lambda e: replace(e, state=DEAD),  # killed by someone else
        lambda e: replace(e, incarnation=e.incarnation + 1, heartbeat=0),  # revived as a new life
    ],
    ids=["moved", "span", "heartbeat", "killed", "new-life"],
)
def test_no_one_but_the_owner_changes_an_entry(forge):
    t = table(FakeClock(100.0))
    t.merge([entry()])
    before = t.entries()
    with pytest.raises(ValueError, match="not signed by its owner"):
        t.merge([entry("c"), forge(entry())])  # nothing of a message with a forgery is taken
    assert t.entries() == before


def test_an_entry_signed_with_another_key_is_refused():
    e = entry()
    with_other_key = replace(e, public_key=IDS["x"].public_key)
    with pytest.raises(ValueError, match="peer_id must be the id its public_key owns"):
        parse_entries([with_other_key.to_json()])
    resigned = replace(e, start=2).signed(IDS["x"])  # signed, but by x: it is x's entry, not b's
    assert resigned.peer_id != B


def test_silent_peer_becomes_suspect_then_dead_then_forgotten():
    clock = FakeClock(100.0)
    t = table(clock)
    t.merge([entry()])
    t.vouch(B, 1)
    assert t.status(B) == SERVING and [e.peer_id for e in t.serving("m")] == [B]
    clock.now += 4
    assert t.status(B) == "suspect" and t.serving("m") == []
    clock.now += 3
    assert t.sweep() == [B] and t.status(B) == DEAD
    assert B not in {e.peer_id for e in t.entries()}  # a death found here is not gossiped
    t.merge([entry(hb=1)])  # stale gossip of the dead life
    assert t.status(B) == DEAD
    clock.now += 31
    t.sweep()
    assert t.status(B) is None


def test_a_later_heartbeat_of_a_life_declared_dead_here_brings_it_back():
    """A death is this peer's own finding; the owner's next signed heartbeat refutes it (a peer
    frozen for a while comes back without a new life)."""
    clock = FakeClock(100.0)
    t = table(clock)
    t.merge([entry(hb=1)])
    clock.now += 7
    assert t.sweep() == [B]
    t.merge([entry(hb=2)])
    assert t.status(B) == SERVING and B in {e.peer_id for e in t.live()}


def test_heartbeat_refutes_suspicion_and_failure_reports_speed_it_up():
    clock = FakeClock(100.0)
    t = table(clock)
    t.merge([entry(hb=1)])
    clock.now += 4
    t.merge([entry(hb=2)])
    assert t.status(B) == SERVING
    t.report_failure(B)
    assert t.status(B) == "suspect"
    clock.now += 3.5
    assert t.sweep() == [B]


def test_restarted_peer_is_one_new_life():
    clock = FakeClock(100.0)
    t = table(clock)
    t.merge([entry(inc=1, hb=5)])
    clock.now += 7
    t.sweep()
    t.merge([entry(inc=2, hb=0)])  # same identity, new process
    assert t.status(B) == SERVING
    assert [e.incarnation for e in t.entries() if e.peer_id == B] == [2]


def test_a_peer_that_left_is_dead_by_its_own_signed_tombstone():
    clock = FakeClock(100.0)
    a, c = table(clock, "a"), table(clock, "c")
    a.merge([entry(hb=1)])
    a.merge([entry(hb=2, state=LEAVING)])
    a.merge([entry(hb=3, state=DEAD)])
    assert a.status(B) == DEAD
    c.merge(a.entries())  # the tombstone travels: c never saw b alive, and never will in that life
    c.merge([entry(hb=9)])
    assert c.status(B) == DEAD


def test_a_newer_version_of_this_peer_signed_by_itself_starts_a_new_life():
    """Only a former life of this identity (e.g. a clock that went back) can sign a version this
    peer does not have: it takes a life newer than it."""
    t = table(FakeClock(100.0))
    me = t.me
    t.merge([replace(me, heartbeat=me.heartbeat + 50).signed(IDS["a"])])
    assert t.me.incarnation > me.incarnation and (t.me.start, t.me.end) == (me.start, me.end)
    again = t.me
    t.merge([replace(again, heartbeat=0).signed(IDS["a"])])  # stale: no change
    assert t.me == again
    old = t.me.incarnation
    t.merge([replace(t.me, state=DEAD).signed(IDS["a"])])  # its own tombstone of this life
    assert t.me.incarnation > old and t.me.state == JOINING


def test_own_changes_advance_the_heartbeat_and_are_signed():
    t = table(FakeClock(100.0))
    hb = t.me.heartbeat
    t.update_me(state=SERVING)
    assert t.me.heartbeat == hb + 1 and t.me.verify() and t.me.peer_id == pid("a")


def test_gossip_targets_are_addresses_of_live_peers_or_seeds():
    clock = FakeClock(100.0)
    t = table(clock)
    assert t.gossip_targets(["s:1", "a:1"]) == ["s:1"]
    t.merge([entry(f"p{i}") for i in range(10)])
    picked = t.gossip_targets([], random.Random(0))  # none vouched for yet: peers not yet dialled
    assert (
        len(picked) == UNVOUCHED_DIALS_PER_ROUND and "a:1" not in picked and len(set(picked)) == len(picked)
    )
    assert all(p.startswith("p") and p.endswith(":1") for p in picked)
    for i in range(10):
        t.vouch(pid(f"p{i}"), 1)
    assert len(t.gossip_targets([], random.Random(0))) == S.fanout
    with_seed = t.gossip_targets(["p1:1", "down:1"], random.Random(0))  # a seed not yet reached
    assert len(with_seed) == S.fanout + 1 and with_seed[-1] == "down:1"


@pytest.mark.parametrize("bad", [dict(interval_s=0), dict(fanout=0), dict(suspect_after_s=0.5, interval_s=1)])
def test_settings_are_validated(bad):
    with pytest.raises(ValueError):
        GossipSettings(**bad)


def test_tombstones_keep_their_age_and_expire_everywhere():
    clock = FakeClock(100.0)
    a, b = table(clock, "a"), table(clock, "b")
    for t in (a, b):
        t.merge([entry("c", hb=1)])
        t.merge([entry("c", hb=2, state=DEAD)])  # c left
    for _ in range(40):  # they keep gossiping; the tombstone must not be renewed by the exchange
        clock.now += 1
        a.sweep(), b.sweep()
        a.merge(b.entries())
        b.merge(a.entries())
    assert a.status(pid("c")) is None and b.status(pid("c")) is None


def test_rebalance_moves_only_a_redundant_larger_id_peer_into_a_gap():
    from peers.swarm.placement import rebalance_target

    clock = FakeClock(100.0)
    low_name, high_name = sorted(["a", "b"], key=pid)
    low = Table(entry(low_name, end=2), IDS[low_name], S, clock)
    high = Table(entry(high_name, end=2), IDS[high_name], S, clock)
    low.merge([entry(high_name, end=2)])
    high.merge([entry(low_name, end=2)])
    low.vouch(pid(high_name), 1)
    high.vouch(pid(low_name), 1)
    assert rebalance_target(high, "m", 4) == (2, 4)  # layers 2-3 unserved; the smaller id keeps 0-1
    assert rebalance_target(low, "m", 4) is None  # the smallest id never moves
    high.merge([entry("c", start=2, end=4)])
    high.vouch(pid("c"), 1)
    assert rebalance_target(high, "m", 4) is None  # no gap: stay


def test_only_peers_that_answered_at_their_address_are_routed_to():
    """A peer only heard of (e.g. a fake entry gossiped for a silent port), or a new life not yet
    confirmed, is not served until it answers this peer as that life."""
    clock = FakeClock(100.0)
    t = table(clock)
    t.merge([entry()])
    assert t.status(B) == SERVING and t.serving("m") == []
    assert "b:1" in t.gossip_targets([], random.Random(0))  # dialled next round
    t.vouch(B, 1)
    t.merge([entry(hb=2)])  # its heartbeats keep it vouched
    assert [e.peer_id for e in t.serving("m")] == [B]
    t.merge([entry(inc=2, hb=0)])  # a new life, unconfirmed
    assert t.serving("m") == []
    t.vouch(B, 2)
    assert [e.peer_id for e in t.serving("m")] == [B]
