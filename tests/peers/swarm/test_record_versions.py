"""Peers of different versions gossip together: an older peer's entry (without the fields a newer
version added) and a newer peer's (with fields this version does not know) merge and travel on as
their owners signed them, while no one else can add, strip or change a field."""

import json
from collections import defaultdict

import pytest

from peers.swarm.identity import Identity
from peers.swarm.membership import GossipSettings, Table
from peers.swarm.record import JOINING, SERVING, PeerRecord, parse_entries
from tests.helpers import FakeClock

IDS: dict[str, Identity] = defaultdict(Identity.generate)


def signed_as(name: str, drop: tuple[str, ...] = (), add: dict | None = None) -> dict:
    """Peer `name`'s entry as a version without the fields `drop` and with the fields `add`
    would sign it: the signature covers exactly the fields sent."""
    me = IDS[name]
    record = PeerRecord("", "m", 4, 0, 4, SERVING, 1, 1, 0, address=f"{name}:1").signed(me)
    data = {k: v for k, v in record.to_json().items() if k not in drop} | (add or {})
    fields = {k: v for k, v in data.items() if k not in ("signature", "dead_for_s")}
    message = b"layerswarm-entry\0" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return json.loads(json.dumps(data | {"signature": me.sign(message)}))


def as_json(record: PeerRecord) -> dict:
    return json.loads(json.dumps(record.to_json()))


def merged(entries: list[dict]) -> Table:
    me = PeerRecord("", "m", 4, 0, 0, JOINING, 1, 0, address="a:1").signed(IDS["a"])
    table = Table(
        me, IDS["a"], GossipSettings(interval_s=1, suspect_after_s=3, dead_after_s=6), FakeClock(1.0)
    )
    table.merge(parse_entries(entries), "b:1")
    return table


def test_an_older_peers_entry_takes_the_defaults_and_travels_as_signed():
    old = signed_as("old", drop=("reach", "wire", "links"))
    (record,) = parse_entries([old])
    assert record.verify() and record.reach == "" and record.wire == ("lossless",)
    assert as_json(record) == old  # passed on without the fields its owner never sent
    assert merged([old]).get(record.peer_id) == record


def test_a_newer_peers_fields_are_kept_and_passed_on():
    new = signed_as("new", add={"relay_addrs": ["/ip4/1.2.3.4/tcp/1"], "zone": {"eu": 1}})
    (record,) = parse_entries([new])
    assert record.verify() and as_json(record) == new
    (again,) = parse_entries([as_json(record)])  # one more hop of gossip
    assert again.verify() and again == record


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: {k: v for k, v in e.items() if k != "reach"},  # a field stripped
        lambda e: e | {"zone": "us"},  # a field added
        lambda e: e | {"relay_addrs": []},  # a newer field changed
    ],
    ids=["stripped", "added", "changed"],
)
def test_no_one_but_the_owner_adds_strips_or_changes_a_field(tamper):
    entry = tamper(signed_as("new", add={"relay_addrs": ["/ip4/1.2.3.4/tcp/1"]}))
    with pytest.raises(ValueError, match="not signed by its owner"):
        merged([entry])


def test_the_fields_every_version_sends_are_required():
    entry = signed_as("old", drop=("address",))
    with pytest.raises(ValueError, match=r"missing \['address'\]"):
        parse_entries([entry])
