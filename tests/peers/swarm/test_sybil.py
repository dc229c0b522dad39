"""Sybil entries (attack 1 of issue 23): entries signed with keys of a stranger's own cannot fill a
table, push gossip past what receivers take, crowd out the peers vouched for, or keep a newcomer
out. In-process tables and gossip over a fake network; each test failed before its defence."""

import asyncio
import json
import random
from collections import defaultdict

import httpx
import pytest

from peers.swarm.admission import (
    DROP_EVICTED,
    DROP_EXPIRED,
    DROP_FULL,
    DROP_RATE,
    MAX_UNVOUCHED_ENTRIES,
    NEW_ENTRIES_PER_SOURCE_PER_MINUTE,
)
from peers.swarm.commitments import Accusations
from peers.swarm.gossip import Gossip
from peers.swarm.identity import Identity
from peers.swarm.membership import (
    JOINING,
    MAX_ENTRIES_PER_MESSAGE,
    MAX_TABLE_ENTRIES,
    SERVING,
    UNVOUCHED_DIALS_PER_ROUND,
    GossipSettings,
    PeerRecord,
    Table,
    parse_entries,
)
from tests.helpers import FakeClock

S = GossipSettings(interval_s=1, suspect_after_s=3, dead_after_s=6, tombstone_s=30)
IDS: dict[str, Identity] = defaultdict(Identity.generate)
ATTACKER = "127.0.0.2"


@pytest.fixture(scope="module")
def sybil_ids() -> list[Identity]:
    return [Identity.generate() for _ in range(1100)]


def entry(name: str, address: str | None = None, hb: int = 1, state: str = SERVING) -> PeerRecord:
    return PeerRecord("", "m", 4, 0, 4, state, 1, hb, 0, address=address or f"{name}:1").signed(IDS[name])


def sybils(ids: list[Identity], hb: int = 1) -> list[PeerRecord]:
    """Entries of made-up peers 'serving' every layer at ports nobody listens on."""
    return [
        PeerRecord("", "m", 4, 0, 4, SERVING, 1, hb, 0, address=f"127.0.0.3:{1000 + i}").signed(identity)
        for i, identity in enumerate(ids)
    ]


def table(clock, name="a", address=None) -> Table:
    return Table(entry(name, address, hb=0, state=JOINING), IDS[name], S, clock)


def unvouched(t: Table) -> list[PeerRecord]:
    return [e for e in t.known() if not t.vouched(e.peer_id)]


class Net:
    """Gossip between in-process peers: a POST to an address is that peer's `receive`, from the
    sender's host, through JSON as on the wire; other addresses refuse the connection."""

    def __init__(self):
        self.peers: dict[str, Gossip] = {}
        self.refused: list[str] = []  # messages a receiver rejected whole

    def add(self, t: Table) -> Gossip:
        host = t.me.address.rpartition(":")[0]
        accusations = Accusations(lambda _: None, lambda *_: None, 60.0, trusted=False)
        gossip = Gossip(t, self.post_from(host), [], lambda: None, accusations)
        self.peers[t.me.address] = gossip
        return gossip

    def post_from(self, host: str):
        async def post(url: str, timeout_s: float, json: dict) -> httpx.Response:
            return self.send(url, json, host)

        return post

    def send(self, url: str, body: dict, host: str) -> httpx.Response:
        request = httpx.Request("POST", url)
        peer = self.peers.get(url.split("/")[2])
        if peer is None:
            raise httpx.ConnectError("connection refused", request=request)
        try:
            reply = peer.receive(json.loads(json.dumps(body)), source=host)
        except ValueError as e:
            self.refused.append(str(e))
            return httpx.Response(400, json={"error": {"message": str(e)}}, request=request)
        return httpx.Response(200, json=json.loads(json.dumps(reply)), request=request)

    def push(self, address: str, entries: list[PeerRecord], host: str = ATTACKER) -> httpx.Response:
        body = {"entries": [e.to_json() for e in entries], "challenge": "c" * 24}
        return self.send(f"http://{address}/swarm/gossip", body, host)

    def rounds(self, clock: FakeClock, n: int, rng: random.Random, between=lambda: None) -> list[str]:
        """`n` gossip rounds of every peer, a second apart; returns the peers declared dead."""
        dead = []
        for _ in range(n):
            clock.now += 1
            between()
            for gossip in list(self.peers.values()):
                gossip.table.beat()
                dead += gossip.table.sweep()
                asyncio.run(gossip.round(gossip.table.gossip_targets(gossip.seeds, rng)))
        return dead


def honest_swarm(clock: FakeClock, n: int = 3) -> tuple[Net, list[Gossip]]:
    """`n` peers on 127.0.0.1 that know and vouched for each other."""
    net = Net()
    gossips = [net.add(table(clock, f"h{i}", f"127.0.0.1:{9000 + i}")) for i in range(n)]
    for g in gossips:
        g.table.update_me(state=SERVING)
        g.seeds = [gossips[0].table.me.address]
    net.rounds(clock, 4, random.Random(0))
    for g in gossips:
        assert len(g.table.serving("m")) == n
    return net, gossips


def test_1023_sybils_pushed_to_one_peer_do_not_take_the_swarm_down(sybil_ids):
    """The attack: 1,023 fresh signed entries pushed a table past the 1,024 cap (room was checked
    before the batch); its gossip then carried more entries than anyone takes, every other peer
    rejected each of its messages whole and declared it dead. Re-signing kept it down."""
    clock, rng = FakeClock(100.0), random.Random(1)
    net, (a, b, c) = honest_swarm(clock)
    hb = iter(range(2, 1000))
    flood = lambda: net.push(a.table.me.address, sybils(sybil_ids[:1023], next(hb)))  # noqa: E731
    assert flood().status_code == 200  # under the message cap: taken in part, not refused
    dead = net.rounds(clock, 12, rng, between=flood)  # 12 s, twice the silence that declares a death
    honest = {g.table.me.peer_id for g in (a, b, c)}
    assert honest.isdisjoint(dead) and net.refused == []  # (strangers that fall silent here die here)
    for g in (a, b, c):
        assert len(g.table.outgoing()) <= MAX_ENTRIES_PER_MESSAGE
        assert len(g.table.known()) <= MAX_TABLE_ENTRIES
        assert all(g.table.status(h.table.me.peer_id) == SERVING for h in (a, b, c))
    assert 0 < len(unvouched(a.table)) <= MAX_UNVOUCHED_ENTRIES
    assert unvouched(b.table) == [] and unvouched(c.table) == []  # strangers' entries are not relayed
    assert a.table.dropped[DROP_RATE] > 0


def test_new_entries_per_source_are_capped_per_minute_and_only_those_taken_are_verified(monkeypatch):
    clock = FakeClock(100.0)
    t = table(clock)
    verified = []
    real_verify = PeerRecord.verify
    monkeypatch.setattr(PeerRecord, "verify", lambda e: verified.append(e.peer_id) or real_verify(e))
    ids = [Identity.generate() for _ in range(500)]
    t.merge(sybils(ids[:300]), "10.0.0.1")
    taken = [e.peer_id for e in unvouched(t)]
    assert len(taken) == NEW_ENTRIES_PER_SOURCE_PER_MINUTE and sorted(verified) == sorted(taken)
    assert t.dropped[DROP_RATE] == 300 - NEW_ENTRIES_PER_SOURCE_PER_MINUTE
    for e in unvouched(t):  # (dialled: room in the unvouched budget again)
        t.vouch(e.peer_id, e.incarnation)
    t.merge(sybils(ids[300:310]), "10.0.0.1")
    assert unvouched(t) == []  # no tokens left
    clock.now += 30  # half a minute: half the tokens back
    t.merge(sybils(ids[310:500]), "10.0.0.1")
    assert len(unvouched(t)) == NEW_ENTRIES_PER_SOURCE_PER_MINUTE // 2
    t.merge([entry("x")], "10.0.0.2")  # another source has tokens of its own
    assert t.get(IDS["x"].peer_id) is not None


def test_a_source_out_of_tokens_costs_no_parsing_or_verifying(sybil_ids, monkeypatch):
    """A flood message is read only as far as its source has tokens (the rest would be dropped
    anyway); news of the strangers already taken (re-signed heartbeats) takes tokens too."""
    clock = FakeClock(100.0)
    net, (a, b) = honest_swarm(clock, 2)
    parsed, verified = [], []
    real_parse, real_verify = PeerRecord.from_json.__func__, PeerRecord.verify
    monkeypatch.setattr(
        PeerRecord, "from_json", classmethod(lambda c, d, n=None: parsed.append(1) or real_parse(c, d, n))
    )
    monkeypatch.setattr(PeerRecord, "verify", lambda e: verified.append(1) or real_verify(e))
    assert net.push(a.table.me.address, sybils(sybil_ids[:1020])).status_code == 200
    assert len(parsed) == len(verified) == NEW_ENTRIES_PER_SOURCE_PER_MINUTE
    parsed.clear(), verified.clear()
    clock.now += 1
    flood = sybils(sybil_ids[:1020], hb=2)  # the same strangers, re-signed, and news of b
    assert net.push(a.table.me.address, [entry("h1", b.table.me.address, hb=50), *flood]).status_code == 200
    tokens_back = int(NEW_ENTRIES_PER_SOURCE_PER_MINUTE / 60)
    assert len(parsed) == 1 + tokens_back and len(verified) == 1 + tokens_back
    assert a.table.get(b.table.me.peer_id).heartbeat == 50  # a peer vouched for is always read
    assert a.table.dropped[DROP_RATE] == 2 * 1020 - NEW_ENTRIES_PER_SOURCE_PER_MINUTE - tokens_back


def test_strangers_never_crowd_out_peers_vouched_for(sybil_ids):
    clock = FakeClock(100.0)
    t = table(clock)
    for i in range(300):  # 300 peers this one dialled
        t.merge([entry(f"v{i}")], f"10.1.{i // 250}.{i % 250}")
        t.vouch(IDS[f"v{i}"].peer_id, 1)
    for start in range(0, 1100, 100):  # a minute apart: every entry has a token
        clock.now += 60
        t.merge(sybils(sybil_ids[start : start + 100]), ATTACKER)
    assert len(unvouched(t)) == MAX_UNVOUCHED_ENTRIES and len(t.known()) == 1 + 300 + MAX_UNVOUCHED_ENTRIES
    assert all(t.vouched(IDS[f"v{i}"].peer_id) for i in range(300))
    assert t.dropped[DROP_FULL] == 1100 - MAX_UNVOUCHED_ENTRIES
    t.merge([entry("newcomer")], "10.2.0.1")  # another source: one of the flood's entries gives way
    assert t.get(IDS["newcomer"].peer_id) is not None and len(unvouched(t)) == MAX_UNVOUCHED_ENTRIES
    assert t.dropped[DROP_EVICTED] == 1


def test_a_full_table_takes_no_stranger_in_place_of_a_peer_vouched_for():
    clock = FakeClock(100.0)
    t = table(clock)
    for i in range(MAX_TABLE_ENTRIES - 1):
        t.merge([entry(f"w{i}")], f"10.3.{i // 250}.{i % 250}")
        t.vouch(IDS[f"w{i}"].peer_id, 1)
    t.merge([entry("late")], "10.4.0.1")
    assert t.get(IDS["late"].peer_id) is None and len(t.known()) == MAX_TABLE_ENTRIES
    assert t.dropped[DROP_FULL] == 1


def test_a_message_carries_the_own_and_vouched_entries_and_never_more_than_a_receiver_takes(sybil_ids):
    clock = FakeClock(100.0)
    t = table(clock)
    for name in "bcd":
        t.merge([entry(name)], "10.0.0.1")
        t.vouch(IDS[name].peer_id, 1)
    t.merge(sybils(sybil_ids[:200]), ATTACKER)
    sent = t.outgoing()
    assert sent[0] == t.me and {e.peer_id for e in sent[1:]} == {IDS[n].peer_id for n in "bcd"}
    assert parse_entries([e.to_json() for e in sent]) == sent
    sample = t.outgoing(limit=3, rng=random.Random(0))
    assert len(sample) == 3 and sample[0] == t.me


def test_a_newcomer_learns_the_vouched_core_while_strangers_flood_it(sybil_ids):
    """A newcomer flooded before it joined still takes the entries its seed vouched for: another
    source's entries give way to them."""
    clock, rng = FakeClock(100.0), random.Random(2)
    net, honest = honest_swarm(clock, 4)
    newcomer = net.add(table(clock, "n", "127.0.0.5:9000"))
    newcomer.seeds = [honest[0].table.me.address]
    net.push(newcomer.table.me.address, sybils(sybil_ids[:1000]))
    for g in honest:
        net.push(g.table.me.address, sybils(sybil_ids[:1000]))
    assert len(unvouched(newcomer.table)) == MAX_UNVOUCHED_ENTRIES
    net.rounds(clock, 3, rng)
    core = {g.table.me.peer_id for g in honest}
    assert core <= {e.peer_id for e in newcomer.table.serving("m")} | {newcomer.table.me.peer_id}
    assert all(g.table.vouched(newcomer.table.me.peer_id) for g in honest)


def test_dial_backs_take_turns_across_sources_and_a_failed_one_gives_way_first(sybil_ids):
    """200 strangers' entries arrived first; the newcomer's, from another source, is dialled in
    the next round (it used to be one random unvouched peer a round: 1 chance in 201)."""
    clock = FakeClock(100.0)
    t = table(clock)
    t.merge(sybils(sybil_ids[:200]), ATTACKER)
    clock.now += 1
    t.merge([entry("newcomer")], "10.0.0.9")
    targets = t.gossip_targets([], random.Random(0))
    assert len(targets) == UNVOUCHED_DIALS_PER_ROUND and "newcomer:1" in targets
    assert targets[:2] == ["127.0.0.3:1000", "newcomer:1"]  # the oldest of each source, in turn
    for address in targets:  # nobody answered: dialled and failed; the flood's next ones go next
        t.dialled(address)
    assert t.gossip_targets([], random.Random(0)) == [
        "127.0.0.3:1003",
        "newcomer:1",
        "127.0.0.3:1004",
        "127.0.0.3:1005",
    ]
    for e in sybils(sybil_ids[:200])[::-1]:
        t.dialled(e.address)
    clock.now += 60
    t.merge(sybils(sybil_ids[200:300]), ATTACKER)  # the budget is full: failed entries give way
    assert t.get(IDS["newcomer"].peer_id) is not None


def test_one_peer_is_vouched_for_per_address():
    clock = FakeClock(100.0)
    t = table(clock)
    t.merge([entry("b", "10.0.0.1:7"), entry("impostor", "10.0.0.1:7")], "10.0.0.1")
    t.vouch(IDS["impostor"].peer_id, 1)  # (say it once answered there)
    t.dialled("10.0.0.1:7", IDS["b"].peer_id, 1)  # now b answers there
    assert t.vouched(IDS["b"].peer_id) and not t.vouched(IDS["impostor"].peer_id)
    t.dialled("10.0.0.1:7")  # a dial nobody answered: a peer vouched for may just be slow
    assert t.vouched(IDS["b"].peer_id)


def test_an_entry_unvouched_for_a_tombstones_time_is_dropped():
    clock = FakeClock(100.0)
    t = table(clock)
    t.merge([entry("b"), entry("c")], "10.0.0.1")
    t.vouch(IDS["b"].peer_id, 1)
    for hb in range(2, 2 + int(S.tombstone_s) + 1):  # both keep their heartbeats going
        clock.now += 1
        t.merge([entry("b", hb=hb), entry("c", hb=hb)], "10.0.0.1")
        t.sweep()
    assert t.get(IDS["b"].peer_id) is not None and t.get(IDS["c"].peer_id) is None
    assert t.dropped[DROP_EXPIRED] == 1
    t.merge([entry("c", hb=99)], "10.0.0.1")  # back as a new entry (one more token of its source's)
    assert t.get(IDS["c"].peer_id) is not None
