"""Fuzzing what peers receive: generated step messages and gossip, in process (the decoders
raise only their own errors) and against a real peer (every malformed input is a 4xx or a
refused frame, never a 5xx; the peer stays healthy and its memory bounded); and the whole HTTP
API from its OpenAPI schema (schemathesis: no input gives a 5xx)."""

import json
import struct

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from peers.swarm.gossip import PATH_GOSSIP
from peers.swarm.identity import Identity
from peers.swarm.membership import parse_entries
from peers.transport.frames import (
    PATH_STEPS,
    STEP_CONTENT_TYPE,
    Hop,
    ProtocolError,
    Sampling,
    StepRequest,
    decode_steps,
    encode_steps,
)
from tests.peers.processes import Swarm

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIVE = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
KEY = Identity.generate()
ENTRY_FIELDS = (
    "peer_id",
    "address",
    "public_key",
    "signature",
    "model",
    "total_layers",
    "start",
    "end",
    "state",
    "incarnation",
    "heartbeat",
    "load",
    "dead_for_s",
)
entries = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "peer_id": st.sampled_from([KEY.peer_id, "a" * 20, ""]) | st.text(max_size=30),
            "address": st.sampled_from(["127.0.0.1:7001", "a:1", "x/y:1", "[::1]:9", ""])
            | st.text(max_size=30),
            "public_key": st.sampled_from([KEY.public_key, KEY.public_key[:-1] + "A", ""])
            | st.text(max_size=50),
            "signature": st.sampled_from([KEY.sign(b"x"), "A" * 86, ""]) | st.text(max_size=90),
            "model": st.sampled_from(["llama", ""]) | st.text(max_size=10),
            "total_layers": st.integers(-5, 10**6) | json_values,
            "start": st.integers(-5, 10) | json_values,
            "end": st.integers(-5, 10) | json_values,
            "state": st.sampled_from(["joining", "serving", "leaving", "dead", "zombie"]),
            "incarnation": st.integers(-1, 2**70),
            "heartbeat": st.integers(-1, 2**60),
            "load": st.integers(-1, 2**60),
            "dead_for_s": st.floats(allow_nan=False) | st.integers(),
        },
    ).map(lambda d: {**{k: 0 for k in ENTRY_FIELDS if k not in d and len(d) > 5}, **d}),
    max_size=5,
)


def valid_message(batch=1, steps=3, hidden=None, hop: Hop | None = None) -> bytes:
    tensor = torch.randint(0, 200, (batch, steps)) if hidden is None else torch.zeros(batch, steps, hidden)
    hops = [hop or Hop("p" * 20, "127.0.0.1:1", 0, 4)]
    return encode_steps([StepRequest("s", 0, hops, Sampling(), tensor)])


def mutated(data: st.DataObject, body: bytes) -> bytes:
    """A valid message with some bytes changed, cut or inserted."""
    out = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        at = data.draw(st.integers(0, max(0, len(out) - 1)))
        if kind == "flip" and out:
            out[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = data.draw(st.binary(max_size=16))
        elif len(out) >= at + 4:
            out[at : at + 4] = struct.pack(">I", data.draw(st.integers(0, 2**32 - 1)))
    return bytes(out)


# -- in process -----------------------------------------------------------------------------------
@FAST
@given(st.data())
def test_the_step_decoder_raises_only_protocol_errors(data):
    body = mutated(data, valid_message(hidden=data.draw(st.sampled_from([None, 8]))))
    try:
        reqs = decode_steps(body)
    except ProtocolError:
        return
    for req in reqs:  # whatever decodes is a well-typed step
        assert isinstance(req.session_id, str) and isinstance(req.position, int) and req.position >= 0
        assert req.hops and all(isinstance(h.start, int) for h in req.hops)


@FAST
@given(st.binary(max_size=200))
def test_random_bytes_never_decode_into_steps(body):
    with pytest.raises(ProtocolError):
        decode_steps(body)


@FAST
@given(entries | json_values)
def test_the_gossip_parser_raises_only_value_errors(items):
    try:
        parsed = parse_entries(items)
    except ValueError:
        return
    for e in parsed:
        assert 0 <= e.start <= e.end <= e.total_layers and ":" in e.address


# -- against a real peer ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peer(tiny_llama, tmp_path_factory):
    """One peer serving the whole tiny model: a complete swarm by itself."""
    s = Swarm(tiny_llama, tmp_path_factory.mktemp("logs"))
    try:
        p = s.add("0:4")
        s.wait_ready()
        s.wait_route(p)
        yield p
    finally:
        s.stop()


def rss_mib(p) -> float:
    with open(f"/proc/{p.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def rss_before(peer):
    for _ in range(20):  # warm up: the first requests allocate what every later one reuses
        httpx.post(
            f"{peer.url}{PATH_STEPS}", content=valid_message(), headers={"content-type": STEP_CONTENT_TYPE}
        )
    return rss_mib(peer)


@LIVE
@given(data=st.data())
def test_fuzzed_step_messages_get_a_4xx_or_refused_frames(peer, rss_before, data):
    route = Hop(peer.peer_id, peer.address, 0, 4)  # a route this peer would run
    msg = valid_message(batch=data.draw(st.integers(1, 3)), steps=data.draw(st.integers(1, 5)), hop=route)
    body = mutated(data, msg) if data.draw(st.booleans()) else msg
    r = httpx.post(
        f"{peer.url}{PATH_STEPS}", content=body, headers={"content-type": STEP_CONTENT_TYPE}, timeout=30
    )
    assert r.status_code in (200, 400, 413), r.text
    if r.status_code == 200:
        for result in r.json()["results"]:
            assert "tokens" in result or result["error"]["type"] in (
                "bad_request",
                "bad_input",
                "session_lost",
                "busy",  # a hop whose peer id was spoiled: addressed to another peer
            )


@LIVE
@given(items=entries | json_values)
def test_fuzzed_gossip_gets_a_4xx_or_merges_valid_entries(peer, rss_before, items):
    r = httpx.post(
        f"{peer.url}{PATH_GOSSIP}",
        content=json.dumps({"entries": items, "challenge": "c" * 24}),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code in (200, 400), r.text


def test_after_the_fuzz_the_peer_is_healthy_and_its_memory_bounded(peer, rss_before):
    assert peer.health() is not None
    r = httpx.post(
        f"{peer.url}/v1/completions",
        json={"model": "llama", "prompt": "hello", "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200
    assert rss_mib(peer) - rss_before < 64, "memory grew under the fuzz"


# -- the OpenAPI schema ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api_schema(peer):
    return schemathesis.openapi.from_url(f"{peer.url}/openapi.json")


def test_no_request_the_schema_allows_gives_a_5xx(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", PATH_GOSSIP}
    for op in operations:

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def call(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                case.body["max_tokens"] = min(max(case.body["max_tokens"], 1), 8)  # short generations
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        call()
