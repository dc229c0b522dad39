"""Peers find each other by gossip; routes appear as soon as layers are covered."""

import httpx

from tests.peers.swarm import wait_until

FAST_GOSSIP = ["--gossip-interval", "0.3", "--suspect-after", "1.5", "--dead-after", "3", "--tombstone", "20"]


def complete(peer, **kw):
    body = {"model": "llama", "prompt": "abc", "max_tokens": 4, "temperature": 0, **kw}
    return httpx.post(f"{peer.url}/v1/completions", json=body, timeout=60)


def test_join_through_any_peer_and_route_appears(tiny_llama, make_swarm):
    swarm = make_swarm(tiny_llama, FAST_GOSSIP)
    a = swarm.add("0:2")
    swarm.wait_ready()
    r = complete(a)
    assert r.status_code == 503
    assert "no peer serves layers 2-3" in r.json()["error"]["message"]

    b = swarm.add("2:3", join=[a.address])
    swarm.wait_ready()
    wait_until(lambda: b.address in {p["peer_id"] for p in a.table()["peers"]}, 20)
    r = complete(a)
    assert r.status_code == 503 and "no peer serves layer 3" in r.json()["error"]["message"]

    c = swarm.add("3:4", join=[b.address])  # joins through the newest peer, not the first
    swarm.wait_ready()
    for peer in (a, b, c):  # everyone knows everyone
        wait_until(
            lambda peer=peer: {x.address for x in (a, b, c)} <= {p["peer_id"] for p in peer.table()["peers"]},
            20,
        )
    swarm.wait_route(a, timeout_s=20)
    assert complete(a).status_code == 200
    assert complete(c).status_code == 200
