"""Hostile HTTP against real peers on loopback: bodies and connections that would hold a peer
(huge, endless or stalled bodies, idle or too many connections), and requests it must refuse
or keep out of its logs; each test fails without its defence."""

import os
import select
import socket
import time

import httpx
import pytest

from peers.swarm.gossip import PATH_GOSSIP
from peers.transport.frames import PATH_STEPS
from tests.peers.processes import wait_until
from tests.peers.transport.guarded import completion, guarded_swarm, raw, read_all, rss_kib


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    """Three peers of the tiny Llama (0:1, 1:3, 3:4) with short HTTP timeouts."""
    with guarded_swarm(tiny_llama, tmp_path_factory.mktemp("logs")) as s:
        yield s


# -- bodies and connections ----------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/chat/completions", PATH_STEPS, PATH_GOSSIP])
def test_a_200_mb_body_gets_413_at_once(swarm, path):
    peer = swarm.peers[0]
    before = rss_kib(peer)
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {200 << 20}\r\n\r\n"
    t0 = time.monotonic()
    with raw(peer, head.encode()) as s:  # the header alone: the peer must not wait for the body
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert time.monotonic() - t0 < 1.0 + 4.0  # answered from the header (bounded with slack for CI)
    assert rss_kib(peer) - before < 10 * 1024


def test_a_body_streamed_past_the_limit_gets_413(swarm):
    peer = swarm.peers[1]

    def chunks():
        for _ in range(64):
            yield b"x" * (128 << 10)  # 8 MiB in all, no length declared

    r = httpx.post(f"{peer.url}/v1/chat/completions", content=chunks(), timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_a_body_that_stops_arriving_gets_408(swarm):
    peer = swarm.peers[1]
    head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
    with raw(peer, head.encode() + b'{"model": ', timeout=15) as s:  # then nothing: a lying length
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


def test_idle_connections_are_closed(swarm):
    peer = swarm.peers[2]
    conns = [socket.create_connection(("127.0.0.1", peer.port), timeout=15) for _ in range(20)]
    conns[0].sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")  # headers that never end
    try:
        for s in conns:
            assert s.recv(1) == b""  # the peer closed it (a timeout here would raise)
    finally:
        for s in conns:
            s.close()
    assert peer.health() is not None


def test_connections_over_the_cap_are_closed_at_once(swarm):
    peer = swarm.peers[2]
    conns = []
    try:
        for _ in range(80):
            conns.append(socket.create_connection(("127.0.0.1", peer.port), timeout=5))
        # well within the 1 s header timeout: only connections over the cap are closed yet
        closed, waiting, deadline = 0, list(conns), time.monotonic() + 0.5
        while waiting and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select(waiting, [], [], left)
            for s in readable:
                waiting.remove(s)
                closed += s.recv(1) == b""
        assert closed >= 80 - 48
    finally:
        for s in conns:
            s.close()
    wait_until(lambda: peer.health() is not None, 10)


# -- requests ------------------------------------------------------------------------------------
def test_a_huge_prompt_is_refused_before_tokenizing(swarm):
    r = completion(swarm.peers[0], prompt="word " * 200_000)  # 1 MB: under the body limit
    assert r.status_code == 400
    assert "characters" in r.json()["error"]["message"]  # counted, not tokenized
    assert swarm.peers[0].health() is not None


def test_no_peer_logs_a_prompt(swarm):
    marker = "zebra-marker-" + os.urandom(4).hex()
    assert completion(swarm.peers[0], prompt=marker).status_code == 200
    assert completion(swarm.peers[0], prompt=marker, max_tokens=10**6).status_code == 400
    for peer in swarm.peers:
        assert marker not in peer.log_path.read_text(errors="replace")
