"""Reachability found by dial-back (peers/swarm/reach.py), with real peers on loopback. A peer
announcing an address nobody can dial (as a volunteer behind a home router does) learns so from
the peers it asks, publishes `reach: none`, and as an entry still answers its own requests
exactly (its results stay on its own connections: none is sent to its address). Peers that
dial each other back are `direct`. A dial-back question names nothing but the asker's own port:
the peer asked dials only the host the question came from, once per port every few seconds."""

import subprocess
import sys
import time

import httpx
import pytest
from transformers import AutoTokenizer

from peers.swarm.reach import ANSWER_EVERY_S, MAX_ANSWERS, PATH_DIALBACK
from tests.helpers import greedy_reference, monolithic
from tests.peers.processes import free_port, wait_until

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def behind_nat(tiny_llama, tmp_path_factory):
    """Two peers that dial each other, and a third announcing a port nobody listens on."""
    from tests.peers.processes import Swarm

    swarm = Swarm(tiny_llama, tmp_path_factory.mktemp("reach"))
    try:
        swarm.add("0:4")
        swarm.add("2:4")
        hidden = swarm.add("0:2", args=["--public-address", f"127.0.0.1:{free_port()}"])
        swarm.wait_ready()
        wait_until(lambda: all(p.health()["reach"] != "unknown" for p in swarm.peers), 60, swarm._why)
        yield swarm, hidden
    finally:
        swarm.stop()


def test_a_peer_nobody_can_dial_learns_it_and_says_so(behind_nat):
    swarm, hidden = behind_nat
    reach = {p.address: p.health()["reach"] for p in swarm.peers}
    assert reach[hidden.address] == "none", reach
    assert [reach[p.address] for p in swarm.peers if p is not hidden] == ["direct", "direct"], reach

    def published() -> str:  # (in the signed entry, as gossip brings it: a round or two later)
        return {e["address"]: e["reach"] for e in swarm.peers[0].table()["peers"]}.get(swarm.peers[1].address)

    wait_until(lambda: published() == "direct", 30, lambda: f"peer 0's table says {published()!r}")
    out = subprocess.run(
        [sys.executable, "-m", "peers.cli", "status", "--peer", hidden.address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    me = hidden.health()["peer_id"]
    (mine,) = [line.split() for line in out.stdout.splitlines() if line.startswith(me)]
    assert mine[4] == "none", out.stdout  # peer, address, layers, state, reach, load


def test_an_entry_nobody_can_dial_keeps_its_results_on_its_own_connections(behind_nat, tiny_llama):
    swarm, hidden = behind_nat
    tok, model = AutoTokenizer.from_pretrained(tiny_llama), monolithic(tiny_llama)
    swarm.wait_route(hidden)
    for prompt in ("hello there", "a peer behind a router"):
        want = tok.decode(greedy_reference(model, tok.encode(prompt), 8), skip_special_tokens=True)
        body = {"model": "llama", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{hidden.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
    returned = hidden.health()["direct_return"]
    assert returned["results_taken"] == 0 and returned["late_step_probes"] == 0, returned


def test_a_dial_back_question_names_only_a_port_and_is_rate_limited(behind_nat):
    swarm, _ = behind_nat
    url = f"{swarm.peers[1].url}{PATH_DIALBACK}"
    me = swarm.peers[0].health()["peer_id"]
    time.sleep(ANSWER_EVERY_S)  # (the peers' own questions from this host)
    # a third party's address cannot be slipped in: the peer asked dials the asker's host only
    elsewhere = {"peer_id": me, "port": swarm.peers[0].port, "host": "192.0.2.1"}
    assert httpx.post(url, json=elsewhere, timeout=10).status_code == 400
    first = httpx.post(url, json={"peer_id": me, "port": swarm.peers[0].port}, timeout=10)
    assert first.status_code == 200 and first.json() == {"reachable": True, "seen_as": "127.0.0.1"}
    again = httpx.post(url, json={"peer_id": me, "port": swarm.peers[0].port}, timeout=10)
    assert again.status_code == 429  # one question per port every ANSWER_EVERY_S
    time.sleep(ANSWER_EVERY_S)
    wrong = httpx.post(url, json={"peer_id": "someone else", "port": swarm.peers[0].port}, timeout=10)
    assert wrong.json()["reachable"] is False  # the peer answering there is not the one named
    time.sleep(ANSWER_EVERY_S)
    # a flood of questions, each for another port: a bounded number of dials (MAX_ANSWERS)
    codes = [
        httpx.post(url, json={"peer_id": me, "port": free_port()}, timeout=10).status_code for _ in range(20)
    ]
    assert codes[-1] == 429 and MAX_ANSWERS - 3 <= codes.count(200) <= MAX_ANSWERS, codes
