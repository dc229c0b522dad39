"""Placement over a fake table: a joining peer chooses the span that most needs serving and
announces it; a redundant serving peer moves into a gap, goes back if the new layers cannot be
loaded, and stops the peer if the old ones cannot either; nothing moves unless it may."""

import asyncio
from dataclasses import replace

import pytest

from peers.swarm.membership import JOINING, SERVING, PeerRecord
from peers.swarm.placement import Placement, PlacementSettings, initial_span, layer_budget

MODEL, TOTAL = "m", 4


def record(peer_id: str, start: int, end: int, state: str = SERVING) -> PeerRecord:
    return PeerRecord(peer_id, MODEL, TOTAL, start, end, state, 1, 1, 0, address=f"{peer_id}:1")


class FakeTable:
    """The part of a membership table placement reads: this peer's entry and the live ones."""

    def __init__(self, me: PeerRecord, *others: PeerRecord):
        self.me, self.others = me, list(others)

    def live(self) -> list[PeerRecord]:
        return [self.me, *self.others]

    def serving(self, model: str) -> list[PeerRecord]:
        return [e for e in self.live() if e.model == model and e.state == SERVING]

    def update_me(self, **changes) -> PeerRecord:
        self.me = replace(self.me, **changes)
        return self.me


class Peer:
    """A placement over `table` whose gossip rounds, loads and unloads are recorded; a load of
    a span in `broken` fails."""

    def __init__(self, table: FakeTable, broken=(), **settings):
        self.table, self.broken, self.events, self.fatal = table, set(broken), [], []
        settings = PlacementSettings(**{"interval_s": 0.0, "settle_s": 0.0, **settings})
        self.placement = Placement(
            table, settings, lambda: 2, self.announce, self.load, self.unload, self.fatal.append
        )

    async def announce(self) -> None:
        self.events.append(("announce", self.table.me.start, self.table.me.end, self.table.me.state))

    async def load(self) -> None:
        span = (self.table.me.start, self.table.me.end)
        self.events.append(("load", *span))
        if span in self.broken:
            raise OSError(f"the weights of {span} cannot be read")
        self.table.update_me(state=SERVING)
        self.placement.serving()

    def unload(self) -> None:
        self.events.append(("unload",))


def test_a_joining_peer_chooses_the_gap_and_announces_it():
    peer = Peer(FakeTable(record("b", 0, 0, JOINING), record("a", 0, 2)))
    asyncio.run(peer.placement.choose())
    assert (peer.table.me.start, peer.table.me.end) == (2, 4)
    assert peer.events == [("announce", 2, 4, JOINING)]  # once: the next round finds it chosen


def test_a_redundant_peer_moves_into_a_gap():
    peer = Peer(FakeTable(record("b", 0, 2), record("a", 0, 2)))

    async def main():
        peer.placement.serving()
        await peer.placement.rebalance()

    asyncio.run(main())
    assert peer.events == [("unload",), ("announce", 2, 4, JOINING), ("load", 2, 4)]
    assert (peer.table.me.start, peer.table.me.end, peer.table.me.state) == (2, 4, SERVING)
    assert not peer.placement.moving and peer.fatal == []


def test_a_failed_move_goes_back_and_a_failed_way_back_is_fatal():
    async def main(broken):
        peer = Peer(FakeTable(record("b", 0, 2), record("a", 0, 2)), broken=broken)
        peer.placement.serving()
        try:
            await peer.placement.rebalance()
        except OSError as e:
            return peer, e
        return peer, None

    back, error = asyncio.run(main({(2, 4)}))
    assert error is None and back.fatal == []
    assert back.events[-2:] == [("load", 2, 4), ("load", 0, 2)]
    assert (back.table.me.start, back.table.me.end, back.table.me.state) == (0, 2, SERVING)
    stuck, error = asyncio.run(main({(2, 4), (0, 2)}))
    assert isinstance(error, OSError) and stuck.fatal == [error]
    assert stuck.table.me.state == JOINING and not stuck.placement.moving


@pytest.mark.parametrize(
    ("why", "settings", "state", "settled"),
    [
        ("placed by --layers", {"auto": False}, SERVING, True),
        ("--no-rebalance", {"rebalance": False}, SERVING, True),
        ("not serving", {}, JOINING, True),
        ("not settled yet", {"settle_s": 60.0}, SERVING, False),
    ],
)
def test_a_peer_moves_only_when_it_may(why, settings, state, settled):
    peer = Peer(FakeTable(record("b", 0, 2, state), record("a", 0, 2)), **settings)

    async def main():
        if settled:
            peer.placement.serving_since = -1e9
        else:
            peer.placement.serving()
        await peer.placement.rebalance()

    asyncio.run(main())
    assert peer.events == [], why


def test_the_smallest_id_keeps_its_layers():
    peer = Peer(FakeTable(record("a", 0, 2), record("b", 0, 2)))
    asyncio.run(peer.placement.rebalance())
    assert peer.events == []


def test_the_initial_span_and_the_budget_of_layers():
    assert initial_span(None, TOTAL) == (0, 0)  # chosen once the swarm is known
    assert initial_span("1:3", TOTAL) == (1, 3)

    class Config:
        num_hidden_layers = TOTAL

    assert layer_budget(2, "unused", Config, None, None, "none") == 2
    assert layer_budget(9, "unused", Config, None, None, "none") == TOTAL
