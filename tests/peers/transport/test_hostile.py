"""Hostile input against real peers on loopback: each attack here worked before its defence
(malformed or forged gossip, frames that steer a peer, a peer that lies about what it computed),
and each test fails without that defence (bodies and connections: test_hostile_http.py)."""

import json
import socket
import threading
import time
from dataclasses import replace

import httpx
import pytest
import torch

from peers.swarm.gossip import PATH_GOSSIP
from peers.swarm.identity import Identity
from peers.swarm.membership import PeerRecord
from peers.transport.frames import (
    PATH_STEPS,
    STEP_CONTENT_TYPE,
    Hop,
    Sampling,
    StepRequest,
    encode_steps,
)
from tests.peers.processes import free_port, wait_until
from tests.peers.transport.guarded import completion, guarded_swarm, raw, rss_kib


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    """Three peers of the tiny Llama (0:1, 1:3, 3:4) with short HTTP timeouts."""
    with guarded_swarm(tiny_llama, tmp_path_factory.mktemp("logs")) as s:
        yield s


def signed_entry(address="127.0.0.1:1", identity: Identity | None = None, **fields) -> dict:
    """A well-formed gossip entry, signed by `identity` (by default a new one: anyone can make
    up a peer of their own)."""
    entry = PeerRecord("", "llama", 4, 0, 4, "serving", 1, 1, 0, address=address)
    return replace(entry, **fields).signed(identity or Identity.generate()).to_json()


def entry_json(address="127.0.0.1:1", **changes) -> dict:
    """A signed entry, then changed as raw JSON (a malformed one)."""
    return {**signed_entry(address), **changes}


def gossip(peer, entries):
    body = {"entries": entries, "challenge": "c" * 24}
    return httpx.post(f"{peer.url}{PATH_GOSSIP}", json=body, timeout=30)


def row_of(peer, address: str) -> dict | None:
    return next((p for p in peer.table()["peers"] if p["address"] == address), None)


def table_ids(peer) -> set[str]:
    return {p["peer_id"] for p in peer.table()["peers"]}


# -- gossip --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"start": "0"}, "start must be an integer"),  # made every request a 500
        ({"address": "127.0.0.1:9/swarm/steps?x="}, "host:port"),  # made peers POST to any URL
        ({"address": "http://127.0.0.1:9"}, "host:port"),
        ({"incarnation": 10**18}, "incarnation must be an integer"),  # took over a live peer's entry
        ({"start": 3, "end": 9}, "end must be an integer in [0, 4]"),
        ({"dead_for_s": float("inf")}, "dead_for_s"),
        ({"state": "serving", "start": 2, "end": 2}, "not a range"),
        ({"extra": 1}, "not signed by its owner"),  # (a newer version's field is kept only as signed)
        ({f"x{i}": 1 for i in range(9)}, "at most 8 unknown fields"),
        ({"x": "y" * 2000}, "longer than 1024"),
        ({"peer_id": "a" * 20}, "peer_id must be the id its public_key owns"),
        ({"signature": "abc"}, "signature must be 64 bytes"),
        ({"heartbeat": 2}, "not signed by its owner"),  # changed after signing
        ({"layer_ms": -1}, "layer_ms must be a number of milliseconds"),  # (would always be "fastest")
        ({"links": [["b" * 20, 1.0]] * 17}, "at most 16"),  # an unbounded list in every message
        ({"links": [["short", 1.0]]}, "a link must be [peer id, ms]"),
        ({"links": [["b" * 20, 1e12]]}, "a link's ms must be"),
    ],
)
def test_malformed_gossip_is_refused_and_merges_nothing(swarm, changes, why):
    peer = swarm.peers[1]
    before = table_ids(peer)
    bad = entry_json(**changes)
    good = signed_entry("127.0.0.1:3")  # nothing of a message with a bad entry is taken
    if "dead_for_s" in changes:  # JSON has no infinity: send it as Python's json writes it
        r = httpx.post(
            f"{peer.url}{PATH_GOSSIP}",
            content=json.dumps({"entries": [good, bad], "challenge": "c" * 24}),
            headers={"content-type": "application/json"},
            timeout=30,
        )
    else:
        r = gossip(peer, [good, bad])
    assert r.status_code == 400 and why in r.text, r.text
    assert table_ids(peer) == before
    assert completion(swarm.peers[0]).status_code == 200


def test_thousands_of_entries_in_one_message_are_refused(swarm):
    """20,000 fake entries in one POST were merged and relayed (RSS +1 GB); now 20,000 are over
    the body cap (413) and 3,000 over the entry cap."""
    peer = swarm.peers[2]
    r = gossip(peer, [signed_entry(f"10.0.{i // 250}.{i % 250}:7001") for i in range(3000)])
    assert r.status_code == 400 and "at most 1024 entries" in r.text
    assert len(table_ids(peer)) == 3


def test_an_expired_tombstone_is_not_taken_back(swarm):
    peer = swarm.peers[2]
    r = gossip(peer, [signed_entry("127.0.0.1:2", state="dead", dead_for_s=10**6)])
    assert r.status_code == 200
    assert row_of(peer, "127.0.0.1:2") is None


def test_a_fake_serving_peer_at_a_silent_port_gets_no_steps(swarm):
    """Gossip of a peer 'serving' every layer at a port that accepts and never answers: routes
    take the fewest hops, so without vouching every request went there and waited out the hop
    deadline. Only peers that answered this peer at their address are routed to."""
    trap = socket.socket()
    trap.bind(("127.0.0.1", free_port()))
    trap.listen(64)
    address = f"127.0.0.1:{trap.getsockname()[1]}"
    received, held = [], []

    def silent():  # accept, read, never answer
        trap.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = trap.accept()
                held.append(conn)
                conn.settimeout(0.2)
            except (TimeoutError, OSError):
                pass
            for conn in held:
                try:
                    received.append(conn.recv(65536))
                except (TimeoutError, OSError):
                    pass

    stop = threading.Event()
    thread = threading.Thread(target=silent)
    thread.start()
    try:
        entry = swarm.peers[0]
        fake = signed_entry(address, incarnation=time.time_ns() // 1000, heartbeat=5)
        assert gossip(entry, [fake]).status_code == 200
        assert row_of(entry, address) is not None
        for prompt in ("one", "two", "three"):
            assert completion(entry, prompt=prompt).status_code == 200
        assert row_of(entry, address)["vouched"] is False
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        trap.close()
    assert not any(PATH_STEPS.encode() in data for data in received)


def forged(row: dict, **changes) -> dict:
    """A peer's entry (a /swarm/table row) with `changes`, signed by someone else."""
    entry = PeerRecord.from_json({k: v for k, v in row.items() if k not in ("status", "vouched")})
    entry = replace(entry, **changes)
    return replace(entry, signature=Identity.generate().sign(entry.signed_message())).to_json()


@pytest.mark.parametrize(
    "changes",
    [
        # a later life 'serving' every layer: was adopted by every table for good
        lambda real: {"incarnation": time.time_ns() // 1000, "heartbeat": 10**6, "start": 0, "end": 4},
        lambda real: {"state": "dead", "heartbeat": real["heartbeat"] + 10**6},  # killed
        lambda real: {"address": "127.0.0.1:1", "heartbeat": real["heartbeat"] + 10**6},  # moved
    ],
    ids=["new-life", "tombstone", "moved"],
)
def test_no_one_can_forge_move_or_kill_a_live_peers_entry(swarm, changes):
    entry, victim = swarm.peers[0], swarm.peers[2]
    real = next(p for p in entry.table()["peers"] if p["peer_id"] == victim.peer_id)
    fake = forged(real, **changes(real))
    for peer in (entry, victim):  # as gossip would relay it
        r = gossip(peer, [fake])
        assert r.status_code == 400 and "not signed by its owner" in r.text
    row = next(p for p in entry.table()["peers"] if p["peer_id"] == victim.peer_id)
    assert row["status"] == "serving" and (row["start"], row["end"], row["address"]) == (3, 4, victim.address)
    assert victim.health()["incarnation"] == real["incarnation"]  # no new life was needed
    assert completion(entry).status_code == 200


def test_a_peer_claiming_a_live_peers_address_is_never_vouched_for(swarm):
    """Anyone may sign an entry of their own that names another peer's address and 'serves'
    every layer. Dialling the address, the caller gets the real peer's signature of its
    challenge: the real one is vouched for, the impostor never is, so routes never name it."""
    entry, victim = swarm.peers[0], swarm.peers[2]
    impostor = signed_entry(victim.address, incarnation=time.time_ns() // 1000, heartbeat=5)
    assert gossip(entry, [impostor]).status_code == 200
    wait_until(lambda: len([p for p in entry.table()["peers"] if p["address"] == victim.address]) == 2, 10)
    time.sleep(3)  # a few gossip rounds: each dials one peer not yet vouched for
    rows = [p for p in entry.table()["peers"] if p["address"] == victim.address]
    vouched = {p["peer_id"]: p["vouched"] for p in rows}
    assert vouched == {victim.peer_id: True, impostor["peer_id"]: False}, vouched
    assert completion(entry).status_code == 200


def test_an_endless_answer_to_gossip_is_cut_off(swarm):
    """A 'peer' that answers gossip with a body that never ends: its caller reads at most a
    few MiB of it, then hangs up, and stays healthy."""
    trap = socket.socket()
    trap.bind(("127.0.0.1", free_port()))
    trap.listen(8)
    trap.settimeout(10)
    address = f"127.0.0.1:{trap.getsockname()[1]}"
    peer = swarm.peers[1]
    before = rss_kib(peer)
    assert gossip(peer, [signed_entry(address, incarnation=time.time_ns() // 1000)]).status_code == 200
    sent = 0
    try:
        conn, _ = trap.accept()  # the peer dials it in its next gossip round (one peer not dialled yet)
        with conn:
            conn.settimeout(10)
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            chunk = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
            while sent < 512 << 20:
                conn.sendall(chunk)
                sent += 1 << 16
    except OSError:
        pass  # the peer hung up
    finally:
        trap.close()
    assert sent < 64 << 20, f"the peer read {sent >> 20} MiB of one answer"
    assert peer.health() is not None and rss_kib(peer) - before < 64 * 1024


# -- step frames ---------------------------------------------------------------------------------
def send_steps(peer, hops, tensor, position=0, session_id="attack"):
    req = StepRequest(session_id, position, hops, Sampling(), tensor)
    r = httpx.post(
        f"{peer.url}{PATH_STEPS}",
        content=encode_steps([req]),
        headers={"content-type": STEP_CONTENT_TYPE},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def hop(peer, start, end):
    return Hop(peer.peer_id, peer.address, start, end)


def test_a_frame_cannot_send_hidden_states_to_an_address_of_its_choosing(swarm):
    p0 = swarm.peers[0]
    trap = socket.socket()
    trap.bind(("127.0.0.1", free_port()))
    trap.listen()
    trap.settimeout(1.5)
    address = f"127.0.0.1:{trap.getsockname()[1]}"
    try:
        result = send_steps(p0, [hop(p0, 0, 1), Hop(address, address, 1, 4)], torch.tensor([[5, 6, 7]]))
        assert "is not a serving peer of its table" in result["error"]["message"]
        with pytest.raises(TimeoutError):  # nobody dialled the address the frame named
            trap.accept()
    finally:
        trap.close()


def test_a_route_that_visits_a_peer_twice_is_refused(swarm):
    p0, p1, p2 = swarm.peers
    route = [hop(p0, 0, 1), hop(p1, 1, 2), hop(p1, 2, 3), hop(p2, 3, 4)]  # tiles the layers
    result = send_steps(p0, route, torch.tensor([[5, 6, 7]]))
    assert result["error"]["type"] == "bad_request"
    assert "more than once" in result["error"]["message"]
    assert completion(p0).status_code == 200  # and nothing is stuck


def test_a_frame_cannot_claim_a_batch_of_256_sequences(swarm):
    p0, p1, p2 = swarm.peers
    route = [hop(p0, 0, 1), hop(p1, 1, 3), hop(p2, 3, 4)]
    result = send_steps(p0, route, torch.full((256, 4), 5))
    assert result["error"]["type"] == "bad_request" and "at most 64 sequences" in result["error"]["message"]
    assert p0.health()["sessions"] == 0


def test_a_frame_past_the_context_is_refused(swarm):
    p1, p2 = swarm.peers[1], swarm.peers[2]
    hidden = torch.zeros(1, 2, 64)
    result = send_steps(p1, [hop(p1, 1, 3), hop(p2, 3, 4)], hidden, position=10**6)
    assert result["error"]["type"] == "bad_request" and "context" in result["error"]["message"]


def test_non_finite_hidden_states_are_the_senders_fault(swarm):
    p1, p2 = swarm.peers[1], swarm.peers[2]
    hidden = torch.full((1, 2, 64), float("nan"))
    result = send_steps(p1, [hop(p1, 1, 3), hop(p2, 3, 4)], hidden)
    assert result["error"]["type"] == "bad_input" and "not finite" in result["error"]["message"]


def test_a_peer_stops_a_frames_work_when_its_sender_hangs_up(tiny_llama, make_swarm):
    """A 512-position prompt run one position per forward: its sender hangs up at once, and
    the peer drops the rest of the work instead of computing it for nobody."""
    s = make_swarm(tiny_llama, ["--prefill-chunk", "1", "--max-batch-tokens", "1"])
    peer = s.add("0:4")
    s.wait_ready()
    s.wait_route(peer)
    req = StepRequest("gone", 0, [hop(peer, 0, 4)], Sampling(), torch.randint(0, 200, (1, 512)))
    body = encode_steps([req])
    head = f"POST {PATH_STEPS} HTTP/1.1\r\nhost: x\r\ncontent-type: {STEP_CONTENT_TYPE}\r\ncontent-length: {len(body)}\r\n\r\n"
    with raw(peer, head.encode() + body):
        time.sleep(0.1)  # then hang up
    positions = lambda: peer.health()["scheduler"]["positions"]  # noqa: E731
    time.sleep(1.0)  # the peer notices within a poll (0.25 s) and a forward
    stopped_at = positions()
    time.sleep(1.0)
    assert positions() == stopped_at < 512


# -- lying peers ---------------------------------------------------------------------------------
NAN_OUTPUT = """
import torch
import inference.scheduler as s
_compute = s._compute
def lying(block, batch):
    out = _compute(block, batch)  # its own check passed; then it sends NaN
    return [torch.full_like(o, float("nan")) if isinstance(o, torch.Tensor) else o for o in out]
s._compute = lying
"""

HUGE_TOKEN = """
import inference.step_sampling as s
from peers.transport.results import StepResult
def lying(batch, results, which):
    return [StepResult([10**12] * batch[i][0].batch, [0.0] * batch[i][0].batch) for i in which]
s._sample = lying
"""


@pytest.mark.parametrize(("liar_span", "patch"), [("1:3", NAN_OUTPUT), ("3:4", HUGE_TOKEN)])
def test_a_lying_peer_is_blamed_not_its_honest_neighbour(tiny_llama, make_swarm, liar_span, patch):
    s = make_swarm(tiny_llama, ["--failover-timeout", "2"])
    spans = {"0:1": None, "1:3": None, "3:4": None, liar_span: patch}
    peers = {span: s.add(span, patch=p) for span, p in spans.items()}
    s.wait_ready()
    for peer in peers.values():
        s.wait_route(peer)
    r = completion(peers["0:1"])
    assert r.status_code == 503, r.text  # the liar's span has no honest replica: no route left
    liar = peers[liar_span].peer_id
    log = peers["0:1"].log_path.read_text(errors="replace")
    assert f"peer {liar} failed" in log and "banned" in log
    honest = [p.peer_id for span, p in peers.items() if span != liar_span and span != "0:1"]
    assert not any(f"peer {h} failed" in log for h in honest), log
