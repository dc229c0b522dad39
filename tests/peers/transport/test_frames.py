"""The step frames and the coalesced steps message: round trips, and hostile bodies refused with
a ProtocolError (a 400 for the sender, nobody banned) instead of a crash."""

import struct
from dataclasses import replace

import pytest
import torch

from peers.transport.frames import (
    Controls,
    Hop,
    ProtocolError,
    Sampling,
    StepRequest,
    decode_step,
    decode_steps,
    encode_step,
    encode_steps,
)


def request(i: int, hidden: bool = False) -> StepRequest:
    tensor = torch.randn(1, 3, 8) if hidden else torch.tensor([[i, i + 1, i + 2]])
    hops = [Hop("127.0.0.1:7001", "127.0.0.1:7001", 0, 2), Hop("127.0.0.1:7002", "127.0.0.1:7002", 2, 4)]
    return StepRequest(f"s{i}", i, hops, Sampling(temperature=0.5, seed=i), tensor, prefix=(i, 7))


def test_steps_round_trip():
    reqs = [request(0), request(1, hidden=True), request(2)]
    got = decode_steps(encode_steps(reqs))
    assert [r.session_id for r in got] == ["s0", "s1", "s2"]
    for a, b in zip(reqs, got, strict=True):
        assert torch.equal(a.tensor, b.tensor) and a.hops == b.hops and a.sampling == b.sampling
        assert a.prefix == b.prefix and a.position == b.position and b.request_id == ""
    traced = replace(request(3), request_id="trace-1")
    assert decode_step(encode_step(traced)).request_id == "trace-1"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        struct.pack(">I", 0),
        struct.pack(">I", 10**6),
        struct.pack(">I", 2) + struct.pack(">I", 5) + b"abc",
        encode_steps([request(0)]) + b"trailing",
    ],
    ids=["empty", "no frames", "too many frames", "truncated", "trailing bytes"],
)
def test_hostile_steps_messages_are_protocol_errors(body):
    with pytest.raises(ProtocolError):
        decode_steps(body)


def _frame_with(**changes) -> bytes:
    import json

    frame = encode_step(request(0))
    (n,) = struct.unpack_from(">I", frame)
    header = json.loads(frame[4 : 4 + n])
    header.update(changes)
    meta = json.dumps(header).encode()
    return struct.pack(">I", len(meta)) + meta + frame[4 + n :]


@pytest.mark.parametrize(
    "changes",
    [
        {"position": "0"},
        {"position": -1},
        {"session_id": 5},
        {"hops": []},
        {"hops": [{"peer_id": "a", "address": "b", "start": "0", "end": 2}]},
        {"sampling": {"temperature": "hot"}},
        {"sampling": {"temperature": float("nan")}},
        {"sampling": {"temperature": 0.5, "top_p": 0}},
        {"sampling": {"temperature": 0.5, "top_k": -1}},
        {"prefix": ["x"]},
        {"shape": [1, -3]},
        {"dtype": "float32"},
        {"request_id": 7},
        {"request_id": "x" * 65},
        {"request_id": "line\nbreak"},  # (it goes into log lines: no forged lines)
        {"sampling": {"temperature": 0.5, "logit_bias": [[-1, 2.0]]}},
        {"sampling": {"temperature": 0.5, "logit_bias": [[3, float("inf")]]}},
        {"sampling": {"temperature": 0.5, "logit_bias": [[3, 500]]}},
        {"sampling": {"temperature": 0.5, "logit_bias": {"3": 1}}},
        {"sampling": {"temperature": 0.5, "presence_penalty": 9}},
        {"sampling": {"temperature": 0.5, "repetition_penalty": 0}},
        {"sampling": {"temperature": 0.5, "min_p": 2}},
        {"sampling": {"temperature": 0.5, "top_logprobs": 21}},
        {"sampling": {"temperature": 0.5, "prompt_tokens": [1, "2"]}},
        {"controls": [{}, {}]},  # one row, two controls
        {"controls": [{"banned": [-5]}]},
        {"controls": [{"counts": [[1]]}]},
        {"controls": [{"counts": [[1, 1.5]]}]},
        {"controls": [{"counts": [[1, -2]]}]},  # (would turn a penalty into a bonus)
        {"controls": [{"counts": [[1, 0]]}]},
        {"controls": [{"counts": [[1, 1 << 40]]}]},  # (would overflow a tensor)
        {"controls": [{"counts": [[1, 1], [1, 2]]}]},
        {"controls": [{"mask": 12}]},
        {"controls": [{"mask": "x" * (1 << 19)}]},
        {"controls": [{"unknown": 1}]},
        {"controls": {"banned": [1]}},
    ],
    ids=lambda c: f"{next(iter(c))}={str(next(iter(c.values())))[:12]!r}",
)
def test_step_headers_of_the_wrong_type_are_refused(changes):
    with pytest.raises(ProtocolError):
        decode_step(_frame_with(**changes))


def test_sampling_and_controls_round_trip():
    from inference.grammar import pack_mask

    sampling = Sampling(
        temperature=0.7,
        seed=3,
        min_p=0.1,
        logit_bias=((5, -100.0), (9, 2.5)),
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.3,
        prompt_tokens=(1, 4, 9),
        top_logprobs=5,
    )
    controls = (Controls(counts=((4, 2), (7, 1)), banned=(2,), mask=pack_mask(b"\xff" * 4 + b"\x00" * 28)),)
    got = decode_step(encode_step(replace(request(0), sampling=sampling, controls=controls)))
    assert got.sampling == sampling and got.controls == controls
    plain = encode_step(request(0))  # defaults travel as nothing
    assert b"logit_bias" not in plain and b"controls" not in plain


def test_a_route_must_tile_the_layers_to_the_end():
    from peers.hop import route_problem

    hop = lambda a, b, p="127.0.0.1:1": Hop(p, p, a, b)  # noqa: E731
    assert route_problem([hop(0, 2), hop(2, 4, "127.0.0.1:2")], 4) is None
    assert "more than once" in route_problem([hop(0, 2), hop(2, 4)], 4)
    assert "skips or repeats" in route_problem([hop(0, 2), hop(3, 4, "127.0.0.1:2")], 4)
    assert "ends at layer 2" in route_problem([hop(0, 2)], 4)
    assert "bad layer range" in route_problem([Hop("a", "127.0.0.1:9", 4, 4)], 4)


def test_seals_travel_one_per_hop_of_a_checked_step_only():
    """A checked step carries one seal per hop (each SEAL_CHARS of base64url), or none; a shadow's
    frame (terminal) and an unchecked step carry none; anything else is a ProtocolError naming it."""
    from peers.swarm.seals import SEAL_CHARS, blank_seal

    checked = replace(request(0), verify="d" * 32, seals=(blank_seal(), blank_seal()))
    assert decode_step(encode_step(checked)).seals == checked.seals
    bad = [
        (replace(checked, seals=checked.seals[:1]), "one seal per hop"),
        (replace(checked, verify=""), "one seal per hop"),
        (replace(checked, hops=checked.hops[:1], terminal=True, seals=checked.seals[:1]), "one seal per hop"),
        (replace(checked, seals=(blank_seal(), blank_seal()[:-1])), f"{SEAL_CHARS} characters"),
        (replace(checked, seals=(blank_seal(), "!" * SEAL_CHARS)), f"{SEAL_CHARS} characters"),
        (replace(checked, verify="", seals=(), terminal=True), "verify digest"),
    ]
    for req, why in bad:
        with pytest.raises(ProtocolError, match=why):
            decode_step(encode_step(req))
