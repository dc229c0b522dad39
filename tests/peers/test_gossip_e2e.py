"""Gossip between real peers: newcomers spread in O(log N) rounds, the dead are declared within
the detection time, and nobody alive is declared dead in a minute of normal running."""

import math
import time

import httpx

from tests.peers.swarm import wait_until

INTERVAL_S, DEAD_AFTER_S = 0.5, 4.0
GOSSIP = ["--gossip-interval", str(INTERVAL_S), "--suspect-after", "2", "--dead-after", str(DEAD_AFTER_S)]


def knows(peer, other, status="serving"):
    rows = {r["peer_id"]: r for r in peer.table()["peers"]}
    return other.address in rows and rows[other.address]["status"] == status


def test_six_peers_spread_news_detect_deaths_and_stay_quiet(tiny_llama, make_swarm):
    swarm = make_swarm(tiny_llama, GOSSIP)
    first = swarm.add("0:4")
    for i in range(5):  # each joins through a different earlier peer
        swarm.add("0:4", join=[swarm.peers[i].address])
    swarm.wait_ready()
    six = list(swarm.peers)
    wait_until(lambda: all(len(p.table()["peers"]) == 6 for p in six), 30, swarm._why)
    started = time.monotonic()

    seventh = swarm.add("0:4", join=[six[3].address])
    swarm.wait_ready([seventh])
    t0 = time.monotonic()
    wait_until(lambda: all(knows(p, seventh) for p in six), 30, swarm._why, interval_s=0.05)
    rounds = (time.monotonic() - t0) / INTERVAL_S
    assert rounds <= 2 * math.ceil(math.log2(7)) + 2, f"took {rounds:.1f} rounds"

    victim = six[2]
    victim.kill()
    t0 = time.monotonic()
    others = [p for p in swarm.peers if p is not victim]
    wait_until(lambda: all(knows(p, victim, "dead") for p in others), 30, swarm._why, interval_s=0.1)
    assert time.monotonic() - t0 <= DEAD_AFTER_S + 2 * INTERVAL_S + 1.0

    while time.monotonic() - started < 60:  # a minute of normal running, with some traffic
        body = {"model": "llama", "prompt": "keep busy", "max_tokens": 8, "temperature": 0}
        assert httpx.post(f"{first.url}/v1/completions", json=body, timeout=30).status_code == 200
        time.sleep(1)
    live = {p.address: p.health()["incarnation"] for p in others}
    for p in others:
        table = p.table()
        false_deaths = [d for d in table["declared_dead"] if live.get(d[0]) == d[1]]
        assert not false_deaths, (p.address, false_deaths)
        assert all(r["status"] == "serving" for r in table["peers"] if r["peer_id"] in live)
