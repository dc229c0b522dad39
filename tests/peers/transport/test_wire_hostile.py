"""Hostile compressed frames (peers/transport/wire.py): each spoiled header field or payload, and
random mutations of whole frames, raise a ProtocolError and nothing else."""

import json
import struct
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peers.transport.frames import ProtocolError, decode_step, encode_step
from peers.transport.wire import BF16, ENCODINGS, FP16, INT8, LOSSLESS, encode_hidden
from tests.peers.transport.wire_samples import hidden, round_trip, step


def _frame(
    x: torch.Tensor, encoding: str, header: dict | None = None, payload=None, edges: bool = False
) -> bytes:
    """An encoded step frame, its header changed (a field set to None: removed) and/or its
    payload replaced; without `edges`, one whose positions all travel in `encoding` (with them,
    a frame from position 0)."""
    frame = encode_step(replace(step(x, encoding), position=0) if edges else step(x, encoding))
    (n,) = struct.unpack_from(">I", frame)
    meta = json.loads(frame[4 : 4 + n])
    if not edges:
        meta.update(head=None, tail=None, edge_encoding=None)
        payload = encode_hidden(x, encoding)[1] if payload is None else payload
    meta.update(header or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    meta_bytes = json.dumps(meta).encode()
    return struct.pack(">I", len(meta_bytes)) + meta_bytes + (frame[4 + n :] if payload is None else payload)


def test_the_hostile_frames_base_decodes():
    """The frames the next test spoils decode as they are (each case fails by its change only)."""
    for encoding in ENCODINGS:
        assert torch.equal(decode_step(_frame(X, encoding)).tensor, round_trip(X, encoding))
        got = decode_step(_frame(E, encoding, edges=True)).tensor
        assert torch.equal(got, decode_step(encode_step(replace(step(E, encoding), position=0))).tensor)


def _int8_payload(x: torch.Tensor, scale=None, value=None, where=None, outlier=None) -> bytes:
    """An int8 payload of `x` ([1, 3, 64]: 3 rows, 1 scale and 8 outliers a row) with its first
    scale, int8 value, outlier positions of the first row or outlier value replaced."""
    fields, payload = encode_hidden(x, INT8)
    out = bytearray(payload)
    scales, positions, values = 0, 3 * 2, 3 * 2 + 3 * 8 * 2  # offsets
    if scale is not None:
        out[scales : scales + 2] = struct.pack("<e", scale)
    if where is not None:
        out[positions : positions + 16] = struct.pack("<8H", *where)
    if outlier is not None:
        out[values : values + 2] = struct.pack("<e", outlier)
    if value is not None:
        out[len(out) - x.numel()] = value & 0xFF
    return bytes(out)


X = hidden((1, 3, 64))
E = hidden((1, 20, 64))  # from position 0: int8 sends 1 + 17 of them as float16, bf16 the last


@pytest.mark.parametrize(
    "frame",
    [
        _frame(X, INT8, {"encoding": "int4"}),
        _frame(X, INT8, {"encoding": 8}),
        _frame(X, BF16, {"encoding": "BF16"}),
        _frame(X, INT8, payload=_int8_payload(X)[:-1]),  # a byte short
        _frame(X, INT8, payload=_int8_payload(X) + b"\0"),  # a byte over
        _frame(X, INT8, payload=_int8_payload(X)[2:]),  # a scale short
        _frame(X, BF16, payload=encode_hidden(X, BF16)[1] + b"\0\0"),
        _frame(X, FP16, {"shape": [1, 3, 65]}),
        _frame(X, INT8, payload=_int8_payload(X, scale=float("nan"))),
        _frame(X, INT8, payload=_int8_payload(X, scale=float("inf"))),
        _frame(X, INT8, payload=_int8_payload(X, scale=-1.0)),
        _frame(X, INT8, payload=_int8_payload(X, value=-128)),
        _frame(X, INT8, payload=_int8_payload(X, outlier=float("nan"))),
        _frame(X, INT8, payload=_int8_payload(X, outlier=float("-inf"))),
        _frame(X, INT8, payload=_int8_payload(X, where=[0, 1, 2, 3, 4, 5, 6, 64])),  # past the row
        _frame(X, INT8, payload=_int8_payload(X, where=[0, 1, 2, 3, 4, 5, 6, 6])),  # twice
        _frame(X, INT8, payload=_int8_payload(X, where=[1, 0, 2, 3, 4, 5, 6, 7])),  # not ascending
        _frame(X, INT8, {"outliers": 7}),  # (the lengths no longer fit)
        _frame(X, INT8, {"outliers": 65}),
        _frame(X, INT8, {"outliers": -1}),
        _frame(X, INT8, {"outliers": 8.0}),
        _frame(X, INT8, {"outliers": None}),
        _frame(X, BF16, {"outliers": 0}),
        _frame(X, INT8, {"block": 48}),
        _frame(X, INT8, {"block": True}),
        _frame(X, INT8, {"block": None}),
        _frame(X, INT8, {"scale_dtype": "float64"}),
        _frame(X, INT8, {"scale_dtype": None}),
        _frame(X, INT8, {"scale_dtype": "float32"}),  # (the lengths no longer fit)
        _frame(X, BF16, {"block": 64}),  # a field the encoding does not have
        _frame(X, LOSSLESS, {"scale_dtype": "float16"}),
        _frame(X, INT8, {"dtype": "int64"}),  # token ids are never compressed
        _frame(X, BF16, {"shape": [3, 64], "dtype": "float32"}),  # nor anything but [B, T, H]
        _frame(X, FP16, {"head": 0, "tail": 1, "edge_encoding": "fp16"}),  # fp16 has no edges
        _frame(X, LOSSLESS, {"head": 0, "tail": 1, "edge_encoding": "fp16"}),
        _frame(E, BF16, {"tail": 21}, edges=True),  # more than the frame's 20 positions
        _frame(E, BF16, {"tail": -1}, edges=True),
        _frame(E, INT8, {"head": 4}, edges=True),  # 4 + 17 past the 20 positions
        _frame(E, INT8, {"head": -1}, edges=True),
        _frame(E, INT8, {"tail": True}, edges=True),
        _frame(E, INT8, {"head": 1.0}, edges=True),
        _frame(E, INT8, {"tail": 16}, edges=True),  # (the lengths no longer fit)
        _frame(E, INT8, {"head": 0}, edges=True),  # (the lengths no longer fit)
        _frame(E, INT8, {"edge_encoding": "int8"}, edges=True),
        _frame(E, BF16, {"edge_encoding": "lossless"}, edges=True),  # (lengths no longer fit)
        _frame(E, BF16, {"edge_encoding": None}, edges=True),  # not all three
        _frame(E, BF16, {"tail": None}, edges=True),
        _frame(E, INT8, {"head": None}, edges=True),
        _frame(E, INT8, payload=encode_hidden(E, INT8, sampled=1, start=0)[1][:-2], edges=True),
    ],
    ids=[
        "unknown encoding",
        "encoding not a name",
        "encoding in capitals",
        "int8 a byte short",
        "int8 a byte over",
        "int8 a scale short",
        "bf16 two bytes over",
        "fp16 shape past the data",
        "nan scale",
        "inf scale",
        "negative scale",
        "int8 value -128",
        "nan outlier",
        "-inf outlier",
        "outlier past the row",
        "outlier position twice",
        "outlier positions unordered",
        "outlier count lies",
        "65 outliers",
        "-1 outliers",
        "outliers a float",
        "no outliers field",
        "bf16 with outliers",
        "block 48",
        "block true",
        "no block",
        "scales float64",
        "no scale dtype",
        "scale dtype lies",
        "bf16 with a block",
        "lossless with a scale dtype",
        "int8 token ids",
        "bf16 of two dimensions",
        "fp16 with edges",
        "lossless with edges",
        "tail past the positions",
        "tail negative",
        "head and tail past the positions",
        "head negative",
        "tail true",
        "head a float",
        "tail count lies",
        "head count lies",
        "edges as int8",
        "edge encoding lies",
        "edges without their encoding",
        "no tail",
        "no head",
        "edges short",
    ],
)
def test_hostile_compressed_frames_are_protocol_errors(frame):
    with pytest.raises(ProtocolError):
        decode_step(frame)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_compressed_frames_raise_only_protocol_errors(data):
    encoding = data.draw(st.sampled_from([BF16, FP16, INT8]))
    out = bytearray(encode_step(step(hidden((1, 2, 70)), encoding)))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(out) - 1))
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip":
            out[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del out[at:]
        else:
            out[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        if not out:
            break
    try:
        req = decode_step(bytes(out))
    except ProtocolError:
        return
    assert req.wire in ENCODINGS and req.tensor.dim() == 3 and req.tensor.is_floating_point()
