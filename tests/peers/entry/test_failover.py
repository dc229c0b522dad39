"""Peers die, freeze and come back in the middle of generations; the caller's stream does not
break and the text is exactly the unfailed one. Default model, replicated spans."""

import itertools
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.peers.processes import Swarm, serving_replica, stream_chat, wait_until

pytestmark = pytest.mark.slow

GOSSIP = ["--gossip-interval", "0.5", "--suspect-after", "2", "--dead-after", "4", "--tombstone", "12"]
TIMEOUTS = ["--hop-timeout", "4", "--ban", "3", "--failover-timeout", "60", "--sse-keepalive", "1"]
SPANS = {"first": "0:10", "middle": "10:20", "last": "20:30"}


@pytest.fixture(scope="module")
def swarm(default_model, tmp_path_factory):
    """An entry peer that is never on a route (layers 0:1; routes take fewest hops) and two
    replicas of each third of the model."""
    s = Swarm("smollm2-135m", tmp_path_factory.mktemp("failover-logs"), GOSSIP + TIMEOUTS)
    try:
        s.add("0:1")
        for layers in SPANS.values():
            s.add(layers)
            s.add(layers)
        s.wait_ready(timeout_s=300)
        s.wait_route(s.peers[0])
        wait_until(lambda: all(len(p.table()["peers"]) == 7 for p in s.peers), 60, s._why)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def reference(swarm):
    text, finish, _ = stream_chat(swarm.peers[0])
    assert finish == "length" and len(text) > 100
    return text


def failovers(swarm) -> int:
    return swarm.peers[0].health()["failovers"]


@pytest.mark.parametrize("where", ["middle", "first", "last"])
def test_kill_9_mid_stream_keeps_the_text_exact(swarm, reference, where):
    killed = []
    before = failovers(swarm)

    def on_token(count):
        if count == 12 and not killed:
            victim = serving_replica(swarm, SPANS[where])
            victim.kill()
            killed.append(victim)

    text, finish, _ = stream_chat(swarm.peers[0], on_token)
    assert killed, "no replica was killed"
    assert failovers(swarm) > before  # the killed replica was on this stream's route
    assert text == reference and finish == "length"


def test_killed_peers_restart_on_their_address_without_ghosts(swarm, reference):
    dead = [p for p in swarm.peers if not p.alive()]
    assert len(dead) == 3
    for p in dead:
        p.start()  # same port: a new life of the same peer
    swarm.wait_ready()
    addresses = sorted(p.address for p in swarm.peers)

    def clean():
        for p in swarm.peers:
            rows = p.table()["peers"]
            if sorted(r["address"] for r in rows) != addresses:  # one row per address: no two lives
                return False
            if any(r["status"] != "serving" for r in rows):  # no dead or suspect ghost
                return False
        return True

    wait_until(clean, 30, swarm._why)
    lives = {p.address: p.health()["incarnation"] for p in dead}
    for p in swarm.peers:
        for row in p.table()["peers"]:
            if row["address"] in lives:
                assert row["incarnation"] == lives[row["address"]]
    assert stream_chat(swarm.peers[0])[0] == reference


def test_frozen_peer_fails_over_after_the_deadline_then_recovers(swarm, reference):
    frozen = []
    before = failovers(swarm)

    def on_token(count):
        if count == 12 and not frozen:
            victim = serving_replica(swarm, SPANS["middle"])
            victim.signal(signal.SIGSTOP)
            frozen.append(victim)

    comments = []
    try:
        text, finish, gaps = stream_chat(swarm.peers[0], on_token, comments=comments)
    finally:
        for p in frozen:
            p.signal(signal.SIGCONT)
    assert text == reference and finish == "length"
    assert failovers(swarm) > before  # the frozen replica held this stream's session
    # the hop's 4 s deadline passed with no token: the stream said it was alive meanwhile
    assert comments and set(comments) == {": keep-alive"}
    victim = frozen[0]
    entry = swarm.peers[0]

    def back():
        # (while its tombstone has expired and its own gossip has not arrived, no row at all)
        row = next((r for r in entry.table()["peers"] if r["address"] == victim.address), None)
        return victim.health() and row is not None and row["status"] == "serving"

    wait_until(back, 30, swarm._why)
    served = victim.health()["steps_served"]
    asked = itertools.count()

    def used_again():  # each prompt another routing key: rendezvous hashing spreads them
        body = {"model": "smollm2-135m", "prompt": f"Hello {next(asked)}", "max_tokens": 2, "temperature": 0}
        assert httpx.post(f"{entry.url}/v1/completions", json=body, timeout=60).status_code == 200
        return victim.health()["steps_served"] > served

    wait_until(used_again, 60, swarm._why, interval_s=0)


def test_seeded_sampling_survives_a_kill(swarm):
    expected, _, _ = stream_chat(swarm.peers[0], n=40, temperature=0.8, seed=7)
    killed = []

    def on_token(count):
        if count == 10 and not killed:
            victim = serving_replica(swarm, SPANS["last"])
            victim.kill()
            killed.append(victim)

    text, _, _ = stream_chat(swarm.peers[0], on_token, n=40, temperature=0.8, seed=7)
    assert killed and text == expected


def test_sixteen_concurrent_streams_survive_a_kill_exactly(swarm):
    prompts = [f"Tell me about the number {i} in one long paragraph." for i in range(16)]

    def all_streams(on_token=None):
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda p: stream_chat(swarm.peers[0], on_token, n=24, prompt=p)[0], prompts))

    expected = all_streams()
    killed, before = [], failovers(swarm)
    lock = threading.Lock()

    def on_token(count):
        with lock:
            if count == 8 and not killed:
                replicas = [p for p in swarm.peers if p.layers == SPANS["middle"] and p.alive()]
                victim = max(replicas, key=lambda p: (p.health() or {}).get("sessions", 0))
                assert victim.health()["sessions"] > 0
                victim.kill()
                killed.append(victim)

    got = all_streams(on_token)
    assert killed
    assert failovers(swarm) > before
    assert got == expected
