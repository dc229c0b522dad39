"""A private swarm and a keyed OpenAI door, with real peers on loopback: peer-to-peer requests
without a valid signature (no key, a wrong key, a replay, a skewed clock) get 401 before any
work; the OpenAI door answers only callers with a key; /health stays open."""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from peers import AsyncSwarmClient, SwarmAPIError, SwarmClient
from peers.option_values import read_api_keys
from peers.swarm.gossip import PATH_GOSSIP
from peers.transport.auth import sign_headers, swarm_key_from
from peers.transport.frames import (
    PATH_CLOSE,
    PATH_STEPS,
    PATH_TABLE,
    STEP_CONTENT_TYPE,
    Hop,
    Sampling,
    StepRequest,
    encode_steps,
)
from peers.transport.stream import PATH_STEPS_STREAM
from peers.transport.stream_format import SIGNED_PATHS, parse_stream_answer, stream_message
from tests.peers.processes import Swarm

KEY = "correct horse battery staple"
API_KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def private(tiny_llama, tmp_path_factory):
    s = Swarm(tiny_llama, tmp_path_factory.mktemp("logs"), args=["--swarm-key", KEY, "--api-key", API_KEY])
    try:
        for layers in ("0:1", "1:3", "3:4"):
            s.add(layers)
        s.wait_ready()
        for peer in s.peers:
            wait_gapless(peer)
        yield s
    finally:
        s.stop()


def wait_gapless(peer, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = signed(peer, "GET", PATH_TABLE)
        if r.status_code == 200 and not r.json()["gaps"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{peer.address}: no complete route\n{peer.log_tail()}")


def signed(peer, method, path, body=b"", key=KEY, now=None, headers=None):
    h = sign_headers(key.encode(), method, path, body, now)
    return httpx.request(
        method, f"{peer.url}{path}", content=body, headers={**h, **(headers or {})}, timeout=30
    )


def step_body(peers):
    p0, p1, p2 = peers
    hops = [
        Hop(p.peer_id, p.address, a, b) for p, (a, b) in zip(peers, [(0, 1), (1, 3), (3, 4)], strict=True)
    ]
    return encode_steps([StepRequest("s-attack", 0, hops, Sampling(), torch.tensor([[5, 6, 7]]))])


def served(peer) -> int:
    return httpx.get(f"{peer.url}/health", timeout=5).json()["steps_served"]


def test_a_private_swarm_serves_callers_with_a_key(private):
    client = openai.OpenAI(base_url=f"{private.peers[0].url}/v1", api_key=API_KEY)
    out = client.completions.create(model="llama", prompt="hello", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4


def test_the_openai_door_refuses_callers_without_a_key(private):
    for key in ("", "sk-wrong"):
        client = openai.OpenAI(base_url=f"{private.peers[0].url}/v1", api_key=key or "unused", max_retries=0)
        if not key:
            client = client.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            client.completions.create(model="llama", prompt="hello", max_tokens=4)
        assert e.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{private.peers[0].url}/health", timeout=5).status_code == 200  # stays open


@pytest.mark.parametrize(
    "attack",
    ["unsigned", "wrong key", "skewed clock", "replayed", "tampered body"],
)
def test_unsigned_or_bad_peer_requests_get_401_before_any_work(private, attack):
    p0 = private.peers[0]
    body = step_body(private.peers)
    before = served(p0)
    url = f"{p0.url}{PATH_STEPS}"
    ctype = {"content-type": STEP_CONTENT_TYPE}
    if attack == "unsigned":
        r = httpx.post(url, content=body, headers=ctype, timeout=30)
    elif attack == "wrong key":
        r = signed(p0, "POST", PATH_STEPS, body, key="not the swarm's key at all", headers=ctype)
    elif attack == "skewed clock":
        r = signed(p0, "POST", PATH_STEPS, body, now=time.time() - 120, headers=ctype)
    elif attack == "tampered body":
        h = sign_headers(KEY.encode(), "POST", PATH_STEPS, body)
        r = httpx.post(url, content=body[:-1] + b"\x01", headers={**h, **ctype}, timeout=30)
    else:
        h = sign_headers(KEY.encode(), "POST", PATH_STEPS, body)
        first = httpx.post(url, content=body, headers={**h, **ctype}, timeout=30)
        assert first.status_code == 200
        before = served(p0)
        r = httpx.post(url, content=body, headers={**h, **ctype}, timeout=30)
    assert r.status_code == 401, r.text
    assert served(p0) == before  # nothing was computed


def stream_exchange(peer, handshake_key: str | None, messages: list[bytes]) -> list:
    """Open a steps stream to `peer` (the handshake signed with `handshake_key`, or not at all),
    send `messages`, and read the answers: each (status, JSON) or the exception that ended it."""
    from websockets.asyncio.client import connect

    async def main():
        h = sign_headers(handshake_key.encode(), "GET", PATH_STEPS_STREAM, b"") if handshake_key else {}
        out = []
        async with connect(f"ws://{peer.address}{PATH_STEPS_STREAM}", additional_headers=h, proxy=None) as ws:
            for message in messages:
                await ws.send(message)
                try:
                    _, status, reply = parse_stream_answer(await asyncio.wait_for(ws.recv(), 30))
                    out.append((status, reply))
                except Exception as e:
                    out.append(e)
                    break
        return out

    return asyncio.run(main())


def test_the_steps_stream_is_signed_like_every_peer_request(private):
    """The lean hop's websocket (peers/transport/stream.py): the handshake must be signed; so must
    every message (a wrong key, a tampered body or a replay closes the stream before any work)."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    p0 = private.peers[0]
    body = step_body(private.peers)
    with pytest.raises(InvalidStatus):
        stream_exchange(p0, None, [])
    with pytest.raises(InvalidStatus):
        stream_exchange(p0, "not the swarm's key at all", [])

    def message(key: str, payload: bytes, signed_body: bytes | None = None) -> bytes:
        h = sign_headers(
            key.encode(), "POST", PATH_STEPS_STREAM, payload if signed_body is None else signed_body
        )
        return stream_message(1, h, payload)

    good = message(KEY, body)
    for attack in (
        message("not the swarm's key at all", body),
        message(KEY, body[:-1] + b"\x01", signed_body=body),
    ):
        before = served(p0)
        (outcome,) = stream_exchange(p0, KEY, [attack])
        assert isinstance(outcome, ConnectionClosed), outcome
        assert served(p0) == before
    before = served(p0)
    first, replay = stream_exchange(p0, KEY, [good, good])
    assert first[0] == 200 and isinstance(replay, ConnectionClosed), (first, replay)
    assert served(p0) == before + 1  # the signed message ran; its replay did not

    # a message's kind is under its signature: a steps message's signature does not carry results
    results = json.dumps({"from": "anyone", "results": [{"step_id": "s1", "error": {}}]}).encode()
    signed = sign_headers(KEY.encode(), "POST", SIGNED_PATHS["results"], results)
    (taken,) = stream_exchange(p0, KEY, [stream_message(1, {**signed, "kind": "results"}, results)])
    assert taken[0] == 200, taken
    as_steps = sign_headers(KEY.encode(), "POST", PATH_STEPS_STREAM, results)
    (outcome,) = stream_exchange(p0, KEY, [stream_message(1, {**as_steps, "kind": "results"}, results)])
    assert isinstance(outcome, ConnectionClosed), outcome


@pytest.mark.parametrize("path", [PATH_CLOSE, PATH_GOSSIP])
def test_outsiders_can_neither_close_sessions_nor_gossip(private, path):
    body = {"session_id": "anyone"} if path == PATH_CLOSE else {"entries": []}
    r = httpx.post(f"{private.peers[1].url}{path}", json=body, timeout=30)
    assert r.status_code == 401
    assert httpx.get(f"{private.peers[1].url}{PATH_TABLE}", timeout=30).status_code == 401


def test_a_peer_without_the_key_cannot_join(private, tiny_llama):
    outsider = private.add("0:4", args=["--swarm-key", "another key, sixteen chars"])
    try:
        private.wait_ready([outsider])
        time.sleep(3)  # a few gossip rounds
        ids = {p["address"] for p in signed(private.peers[0], "GET", PATH_TABLE).json()["peers"]}
        assert outsider.address not in ids
    finally:
        outsider.stop()
        private.peers.remove(outsider)


def test_the_sdk_and_peer_status_take_the_keys(private):
    entry = private.peers[0]
    with SwarmClient(entry.address, api_key=API_KEY, swarm_key=KEY.encode()) as client:
        assert client.complete("hello", max_tokens=3, temperature=0).text is not None
        assert client.table()["gaps"] == []

    async def async_table():
        async with AsyncSwarmClient(entry.address, api_key=API_KEY, swarm_key=KEY.encode()) as client:
            return await client.table()

    assert asyncio.run(async_table())["gaps"] == []
    with SwarmClient(entry.address, api_key=API_KEY) as client, pytest.raises(SwarmAPIError) as e:
        client.table()
    assert e.value.status == 401
    out = subprocess.run(
        [sys.executable, "-m", "peers.cli", "status", "--peer", entry.address],
        env={**os.environ, "LAYERSWARM_SWARM_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "a route is complete" in out.stdout, out.stderr


def test_short_keys_are_refused():
    with pytest.raises(ValueError, match="at least 16 characters"):
        swarm_key_from("short")
    args = argparse.Namespace(api_key=["sk 1 2"], api_key_file=None)
    with pytest.raises(ValueError, match="no spaces"):
        read_api_keys(args)
