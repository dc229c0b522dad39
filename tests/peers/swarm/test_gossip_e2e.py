"""Gossip between real peers: newcomers spread in O(log N) rounds, the dead are declared within
the detection time, and nobody alive is declared dead in 60 rounds of normal running. Rounds are
counted, not timed: each peer's own heartbeat advances once per gossip round."""

import math
import statistics
import time

import httpx

from tests.peers.processes import wait_until

INTERVAL_S, DEAD_AFTER_S = 0.5, 4.0
GOSSIP = ["--gossip-interval", str(INTERVAL_S), "--suspect-after", "2", "--dead-after", str(DEAD_AFTER_S)]
QUIET_ROUNDS = 60  # 30 s at INTERVAL_S, 15 times the silence that declares a death


def knows(peer, other, status="serving"):
    rows = {r["address"]: r for r in peer.table()["peers"]}
    return other.address in rows and rows[other.address]["status"] == status


def own_heartbeat(peer) -> int:
    table = peer.table()
    return next(r["heartbeat"] for r in table["peers"] if r["peer_id"] == table["me"])


def rounds_since(heartbeats: dict, peers) -> float:
    """Gossip rounds run since `heartbeats` were read: the median over `peers` (one slow or busy
    peer does not skew it)."""
    return statistics.median(own_heartbeat(p) - heartbeats[p.address] for p in peers)


def test_six_peers_spread_news_detect_deaths_and_stay_quiet(tiny_llama, make_swarm):
    swarm = make_swarm(tiny_llama, GOSSIP)
    first = swarm.add("0:4")
    for i in range(5):  # each joins through a different earlier peer
        swarm.add("0:4", join=[swarm.peers[i].address])
    swarm.wait_ready()
    six = list(swarm.peers)
    wait_until(lambda: all(len(p.table()["peers"]) == 6 for p in six), 30, swarm._why)
    quiet_from = own_heartbeat(first)

    seventh = swarm.add("0:4", join=[six[3].address])
    swarm.wait_ready([seventh])
    before = {p.address: own_heartbeat(p) for p in swarm.peers}
    wait_until(lambda: all(knows(p, seventh) for p in six), 30, swarm._why, interval_s=0.05)
    rounds = rounds_since(before, swarm.peers)
    assert rounds <= 2 * math.ceil(math.log2(7)) + 2, f"took {rounds} rounds"

    victim = six[2]
    others = [p for p in swarm.peers if p is not victim]
    before = {p.address: own_heartbeat(p) for p in others}
    victim.kill()
    wait_until(lambda: all(knows(p, victim, "dead") for p in others), 30, swarm._why, interval_s=0.1)
    rounds = rounds_since(before, others)
    # The silence that declares a death, in rounds, plus a round to sweep and a few for the
    # jitter of the round interval (0.8 to 1.2 of it) and for spreading the tombstone.
    assert rounds <= DEAD_AFTER_S / INTERVAL_S + 4, f"took {rounds} rounds"

    body = {"model": "llama", "prompt": "keep busy", "max_tokens": 8, "temperature": 0}
    for _ in range(3 * QUIET_ROUNDS):  # normal running with some traffic; each pass takes >= 1 s
        if own_heartbeat(first) - quiet_from >= QUIET_ROUNDS:
            break
        assert httpx.post(f"{first.url}/v1/completions", json=body, timeout=30).status_code == 200
        time.sleep(1)
    else:
        raise AssertionError(f"the first peer ran fewer than {QUIET_ROUNDS} gossip rounds\n{swarm._why()}")
    live = {p.peer_id: p.health()["incarnation"] for p in others}
    for p in others:
        table = p.table()
        false_deaths = [d for d in table["declared_dead"] if live.get(d[0]) == d[1]]
        assert not false_deaths, (p.address, false_deaths)
        assert all(r["status"] == "serving" for r in table["peers"] if r["peer_id"] in live)
