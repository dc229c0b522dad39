"""Peers find each other by gossip; routes appear as soon as layers are covered."""

import httpx
import pytest

from tests.peers.processes import wait_until

FAST_GOSSIP = ["--gossip-interval", "0.3", "--suspect-after", "1.5", "--dead-after", "3", "--tombstone", "20"]


def complete(peer, timeout_s=60.0, **kw):
    body = {"model": "llama", "prompt": "abc", "max_tokens": 4, "temperature": 0, **kw}
    return httpx.post(f"{peer.url}/v1/completions", json=body, timeout=timeout_s)


def test_join_through_any_peer_and_route_appears(tiny_llama, make_swarm):
    swarm = make_swarm(tiny_llama, FAST_GOSSIP)
    a = swarm.add("0:2")
    swarm.wait_ready()
    r = complete(a)
    assert r.status_code == 503
    assert "no peer serves layers 2-3" in r.json()["error"]["message"]

    b = swarm.add("2:3", join=[a.address])
    swarm.wait_ready()
    # known, and dialled by a (routes use only peers that answered at their address)
    wait_until(lambda: b.address in {p["address"] for p in a.table()["peers"] if p["vouched"]}, 20)
    r = complete(a)
    assert r.status_code == 503 and "no peer serves layer 3" in r.json()["error"]["message"]

    c = swarm.add("3:4", join=[b.address])  # joins through the newest peer, not the first
    swarm.wait_ready()
    for peer in (a, b, c):  # everyone knows everyone
        wait_until(
            lambda peer=peer: {x.address for x in (a, b, c)} <= {p["address"] for p in peer.table()["peers"]},
            20,
        )
    swarm.wait_route(a, timeout_s=20)
    assert complete(a).status_code == 200
    assert complete(c).status_code == 200


def test_failover_gives_up_with_a_503_that_says_why(tiny_llama, make_swarm):
    swarm = make_swarm(tiny_llama, FAST_GOSSIP + ["--failover-timeout", "2", "--ban", "1"])
    a = swarm.add("0:2")
    b = swarm.add("2:4")
    swarm.wait_ready()
    swarm.wait_route(a)
    b.kill()  # the entry still believes in b: the first hop to it fails, then nothing covers 2-3
    r = complete(a, timeout_s=30)  # the 2 s failover gives up long before the call would time out
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert "gave up after 2 s of failover" in message and "no peer serves layers 2-3" in message
    assert a.health()["sessions"] == 0


@pytest.mark.slow
def test_peers_without_layers_cover_the_model(make_swarm, default_model):
    swarm = make_swarm("smollm2-135m", FAST_GOSSIP + ["--num-layers", "10"])
    first = swarm.add(None)
    swarm.add(None)
    swarm.add(None)  # all three start at once
    swarm.wait_ready(timeout_s=300)
    swarm.wait_route(first, timeout_s=60)
    spans = sorted(tuple(p.health()["layers"]) for p in swarm.peers)
    assert spans == [(0, 10), (10, 20), (20, 30)]
    body = {"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    assert httpx.post(f"{first.url}/v1/completions", json=body, timeout=60).status_code == 200


def test_request_over_the_cache_budget_gets_a_quick_503(tiny_llama, make_swarm):
    swarm = make_swarm(tiny_llama, FAST_GOSSIP + ["--max-cache-tokens", "64"])
    a = swarm.add("0:4")
    swarm.wait_ready()
    swarm.wait_route(a)
    # The failover timeout is the default 60 s: a 503 within the call's 30 s means the entry said
    # "no room" at once instead of re-routing until it gave up.
    r = complete(a, timeout_s=30, prompt="x" * 100)
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "no room for this request" in message and "the cache budget is 64" in message
    assert "gave up" not in message
    assert complete(a).status_code == 200  # the peer was not banned


def test_a_redundant_automatic_peer_moves_into_a_gap(tiny_llama, make_swarm):
    swarm = make_swarm(tiny_llama, FAST_GOSSIP + ["--num-layers", "2"])
    for _ in range(3):  # one after the other: 0:2, 2:4, then a second 0:2
        swarm.add(None)
        swarm.wait_ready()
    spans = {p.address: tuple(p.health()["layers"]) for p in swarm.peers}
    assert sorted(spans.values()) == [(0, 2), (0, 2), (2, 4)]
    lone = next(p for p in swarm.peers if spans[p.address] == (2, 4))
    lone.kill()
    survivors = [p for p in swarm.peers if p is not lone]
    wait_until(lambda: complete(survivors[0]).status_code == 200, 60, swarm._why, interval_s=0.5)
    assert sorted(tuple(p.health()["layers"]) for p in survivors) == [(0, 2), (2, 4)]
    mover = max(survivors, key=lambda p: p.peer_id)  # the larger id moved; the smaller kept 0:2
    assert tuple(mover.health()["layers"]) == (2, 4)
