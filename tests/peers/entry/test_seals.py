"""Sealed shadow instructions: the frame a hop receives has the same shape whether later hops are
checked or not, and each hop opens its own seal alone (which names the shadow it feeds)."""

import time
from types import SimpleNamespace

import torch

from peers.entry.routes import seals_for
from peers.swarm.identity import Identity
from peers.swarm.record import PeerRecord
from peers.swarm.seals import SEAL_CHARS, blank_seal, seal
from peers.transport.frames import Hop, Sampling, StepRequest, decode_step, decode_tensor_frame, encode_step

SPANS = [(0, 1), (1, 2), (2, 3), (3, 4)]


def swarm():
    """Identities and signed records of a route's four hops and of a replica of each but the
    first (the shadows), and an entry-like node whose table holds them."""
    ids = {name: Identity.generate() for name in ["h0", "h1", "h2", "h3", "s1", "s2", "s3"]}
    records = {
        i.peer_id: PeerRecord("", "m", 4, 0, 4, address=f"127.0.0.1:{7000 + n}").signed(i)
        for n, i in enumerate(ids.values())
    }
    node = SimpleNamespace(table=SimpleNamespace(get=records.get))
    route = [
        Hop(ids[f"h{n}"].peer_id, records[ids[f"h{n}"].peer_id].address, a, b)
        for n, (a, b) in enumerate(SPANS)
    ]
    shadows = {n: Hop(ids[f"s{n}"].peer_id, "x:1", *SPANS[n]) for n in (1, 2, 3)}
    return ids, node, route, shadows


def frame(route, seals) -> bytes:
    req = StepRequest("s" * 32, 0, route, Sampling(), torch.zeros(1, 2, 8), verify="d" * 32, seals=seals)
    return encode_step(req)


def test_a_hops_frame_has_one_shape_whatever_later_hops_are_checked():
    """The frame each hop of a route receives (the entry's, then the rest of the route with the
    seals of the hops behind it dropped) has the same header keys and seal lengths, and the same
    size in bytes, with no shadow, with every later hop shadowed, and anything between."""
    ids, node, route, shadows = swarm()
    plans = [(), (shadows[2],), (shadows[3],), (shadows[1], shadows[3]), tuple(shadows.values())]
    for i in range(len(route)):
        shapes = set()
        for plan in plans:
            seals = seals_for(node, route, plan)
            body = frame(route[i:], seals[i:])
            header, _ = decode_tensor_frame(body)
            shapes.add((frozenset(header), tuple(map(len, header["seals"])), len(body)))
            assert "shadows" not in header
        assert len(shapes) == 1, (i, shapes)
        assert next(iter(shapes))[1] == (SEAL_CHARS,) * (len(route) - i)


def test_each_hop_opens_its_own_seal_alone():
    """Seal i names the shadow of hop i + 1 and opens for hop i only; a seal with nothing to say
    (the last hop's, or a hop whose next is not shadowed) opens for no one, as does random bytes;
    a seal survives the frame's encoding byte for byte."""
    ids, node, route, shadows = swarm()
    seals = seals_for(node, route, (shadows[1], shadows[3]))  # hop 0 feeds s1, hop 2 feeds s3
    assert decode_step(frame(route, seals)).seals == seals
    hops = [ids[f"h{n}"] for n in range(4)]
    said = {(n, m): hops[m].unseal(seals[n]) for n in range(4) for m in range(4)}
    assert said.pop((0, 0)) == shadows[1].peer_id.encode()
    assert said.pop((2, 2)) == shadows[3].peer_id.encode()
    assert all(v is None for v in said.values()), said
    assert all(ids[f"s{n}"].unseal(x) is None for n in (1, 2, 3) for x in seals)
    assert hops[0].unseal(blank_seal()) is None
    assert len(seal(hops[0].seal_key, b"")) == len(blank_seal()) == SEAL_CHARS


def test_a_peers_sealing_key_follows_its_identity_and_travels_signed():
    """The sealing key is derived from the identity (a key file keeps it), announced in the
    signed record, and a record whose seal_key is not an X25519 key is refused."""
    import pytest

    a = Identity.generate()
    assert Identity(a._key).seal_key == a.seal_key != Identity.generate().seal_key
    record = PeerRecord("", "m", 4, 0, 4, address="127.0.0.1:1").signed(a)
    data = record.to_json()
    assert PeerRecord.from_json(data).seal_key == a.seal_key and record.verify()
    with pytest.raises(ValueError, match="seal_key"):
        PeerRecord.from_json({**data, "seal_key": "nope"})
    assert not PeerRecord.from_json({**data, "seal_key": Identity.generate().seal_key}).verify()


def test_sealing_and_opening_are_measured():
    """Per hop per step, what checking adds: the entry seals (at most one X25519 exchange per
    hop, once per route) and a hop opens one seal each step; printed with -s."""
    a = Identity.generate()
    n = 200
    t0 = time.perf_counter()
    sealed = [seal(a.seal_key, b"x" * 20) for _ in range(n)]
    t1 = time.perf_counter()
    opened = [a.unseal(x) for x in sealed]
    t2 = time.perf_counter()
    assert all(o == b"x" * 20 for o in opened)
    seal_ms, open_ms = (t1 - t0) / n * 1e3, (t2 - t1) / n * 1e3
    print(f"seal {seal_ms:.3f} ms, open {open_ms:.3f} ms")  # (measured, not asserted: no timed checks)


def test_each_hop_is_checked_on_its_own_at_the_rate():
    """shadows_for with a rate draws each replicated hop on its own: over many routes, each hop
    is shadowed about that often, and whether one is says nothing of the other (the share of
    both is the product), so a hop that learns its next hop is checked learns nothing of itself."""
    import random

    from peers.entry.routes import shadows_for

    ids = [Identity.generate() for _ in range(4)]
    spans = [(1, 2), (1, 2), (2, 4), (2, 4)]
    records = [
        PeerRecord("", "m", 4, a, b, address=f"127.0.0.1:{7100 + n}").signed(i)
        for n, (i, (a, b)) in enumerate(zip(ids, spans, strict=True))
    ]
    node = SimpleNamespace(model_id="m", table=SimpleNamespace(serving=lambda model: records))
    route = [Hop(r.peer_id, r.address, r.start, r.end) for r in (records[0], records[2])]
    random.seed(23)
    draws = [{s.start for s in shadows_for(node, "k", route, set(), 0.2)} for _ in range(4000)]
    first, second = (sum(start in d for d in draws) / len(draws) for start in (1, 2))
    both = sum(d == {1, 2} for d in draws) / len(draws)
    assert 0.17 < first < 0.23 and 0.17 < second < 0.23, (first, second)
    assert abs(both - first * second) < 0.015, (both, first, second)
    assert all(len(shadows_for(node, "k", route, set())) == 2 for _ in range(10))  # (rate 1: all)
