"""The compressed wire (peers/transport/wire.py): codec round trips within each encoding's error, the bytes
a frame takes, hostile frames refused with a ProtocolError, and the encoding chosen per hop."""

import asyncio
import json
import struct
from dataclasses import replace

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peers.swarm.identity import Identity
from peers.swarm.membership import PeerRecord
from peers.transport.forwarder import Forwarder
from peers.transport.frames import (
    Hop,
    ProtocolError,
    Sampling,
    StepRequest,
    decode_step,
    decode_steps,
    encode_step,
)
from peers.transport.wire import (
    BF16,
    ENCODINGS,
    FP16,
    INT8,
    INT8_WINDOW,
    LOSSLESS,
    accepted_encodings,
    decode_hidden,
    encode_hidden,
    hop_encoding,
)

HOPS = [Hop("a" * 43, "127.0.0.1:7001", 10, 20), Hop("b" * 43, "127.0.0.1:7002", 20, 30)]


def hidden(shape=(2, 5, 100), seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[-1])  # blocks of every size
    x[0, 1, 3] = 900.0  # an outlier, as real hidden states have
    return x.to(dtype)


def step(tensor: torch.Tensor, wire: str = LOSSLESS) -> StepRequest:
    return StepRequest("s" * 32, 7, HOPS, Sampling(), tensor, wire=wire)


def round_trip(tensor: torch.Tensor, encoding: str) -> torch.Tensor:
    fields, payload = encode_hidden(tensor, encoding)
    return decode_hidden(fields, tensor.dtype, list(tensor.shape), payload)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lossless_is_bit_exact_and_the_default(dtype):
    x = hidden(dtype=dtype)
    assert torch.equal(round_trip(x, LOSSLESS), x)
    frame = encode_step(step(x))
    assert b"encoding" not in frame  # a lossless frame is the frame peers always sent
    got = decode_step(frame)
    assert got.wire == LOSSLESS and got.tensor.dtype == dtype and torch.equal(got.tensor, x)


@pytest.mark.parametrize(("encoding", "half"), [(BF16, torch.bfloat16), (FP16, torch.float16)])
def test_halves_round_trip_exactly_as_their_dtype(encoding, half):
    x = hidden()
    got = decode_step(encode_step(step(x, encoding)))
    assert got.wire == encoding and got.tensor.dtype == torch.float32
    # within the dtype's rounding, nothing more; the sampled position is float16 (next test)
    assert torch.equal(got.tensor[:, :-1], x[:, :-1].to(half).float())
    assert torch.equal(got.tensor[:, -1], x[:, -1].half().float())
    assert torch.equal(round_trip(x, encoding), x.to(half).float())


@pytest.mark.parametrize("encoding", [BF16, INT8])
@pytest.mark.parametrize("draft", [0, 2])
def test_sampled_positions_and_int8s_window_travel_as_float16(encoding, draft):
    """The positions the last peer samples from (the last of each sequence, or draft + 1 of
    them), and under int8 the INT8_WINDOW before them, keep float16's precision; the others take
    the encoding's."""
    x = hidden((1 if draft else 2, 30, 100))  # (a drafted step is one sequence's)
    x[-1, -1, 7] = 600.0  # an outlier in a sampled position
    got = decode_step(encode_step(replace(step(x, encoding), draft=draft)))
    k = draft + 1 + (INT8_WINDOW if encoding == INT8 else 0)
    assert got.wire == encoding and got.tensor.shape == x.shape
    assert torch.equal(got.tensor[:, -k:], x[:, -k:].half().float())
    assert torch.equal(got.tensor[:, :-k], round_trip(x[:, :-k].contiguous(), encoding))
    fields, _ = encode_hidden(x, encoding, sampled=draft + 1)
    assert (fields["head"], fields["tail"], fields["edge_encoding"]) == (0, k, FP16)
    fields, payload = encode_hidden(x, encoding, sampled=30)  # every position sampled
    assert fields["tail"] == 30
    assert torch.equal(decode_hidden(fields, x.dtype, list(x.shape), payload), x.half().float())


@pytest.mark.parametrize("encoding", [BF16, INT8])
def test_int8_sends_the_attention_sink_as_float16(encoding):
    """Under int8, a frame that starts its sequences (position 0) sends their first position as
    float16 as well; a frame that starts later (a reused prefix, a decode step) has no head."""
    x = hidden((2, 30, 100))
    got = decode_step(encode_step(replace(step(x, encoding), position=0))).tensor
    head, tail = (1, 1 + INT8_WINDOW) if encoding == INT8 else (0, 1)
    assert torch.equal(got[:, :head], x[:, :head].half().float())
    assert torch.equal(got[:, -tail:], x[:, -tail:].half().float())
    assert torch.equal(got[:, head:-tail], round_trip(x[:, head:-tail].contiguous(), encoding))
    assert encode_hidden(x, encoding, sampled=1, start=0)[0]["head"] == head
    assert ("head" in encode_hidden(x, encoding, start=0)[0]) == (encoding == INT8)
    assert encode_hidden(x, encoding, sampled=1, start=5)[0]["head"] == 0
    one = x[:, :1].contiguous()  # a one-position frame at 0: its position is the sampled one
    fields, payload = encode_hidden(one, encoding, sampled=1, start=0)
    assert (fields["head"], fields["tail"]) == (0, 1)
    assert torch.equal(decode_hidden(fields, x.dtype, [2, 1, 100], payload), one.half().float())


def test_edge_positions_beyond_float16_travel_lossless():
    x = hidden((1, 24, 64))
    x[0, -1, 3] = 1e6
    fields, payload = encode_hidden(x, INT8, sampled=1, start=0)
    assert fields["edge_encoding"] == LOSSLESS and (fields["head"], fields["tail"]) == (1, 17)
    got = decode_hidden(fields, x.dtype, list(x.shape), payload)
    assert torch.equal(got[:, :1], x[:, :1]) and torch.equal(got[:, -17:], x[:, -17:])
    assert torch.equal(got[:, 1:-17], round_trip(x[:, 1:-17].contiguous(), INT8))
    assert encode_hidden(x, FP16, sampled=1) == ({}, x.numpy().tobytes())  # fp16 has no edges


def test_fp16_beyond_its_range_travels_lossless():
    x = hidden()
    x[1, 2, 50] = 1e6  # float16 would make it inf
    got = decode_step(encode_step(step(x, FP16)))
    assert got.wire == LOSSLESS and torch.equal(got.tensor, x)


@pytest.mark.parametrize("hidden_size", [64, 100, 576, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_errs_at_most_absmax_over_127_per_block(hidden_size, dtype):
    x = hidden((3, 9, hidden_size), seed=hidden_size, dtype=dtype)
    x[1, 4] = 0.0  # an all-zero row
    fields, payload = encode_hidden(x, INT8)
    k = min(8, hidden_size)
    assert fields == {"encoding": INT8, "block": 64, "outliers": k, "scale_dtype": "float16"}
    got = decode_hidden(fields, dtype, list(x.shape), payload)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got[1, 4], x[1, 4])
    # (decoded into bfloat16, a value adds that dtype's own rounding: 2^-8 of itself)
    _check_blocks(x.float(), got.float(), 64, rounding=2**-8 if dtype == torch.bfloat16 else 0.0)


def _check_blocks(x: torch.Tensor, got: torch.Tensor, block: int, rounding: float = 0.0) -> None:
    """Every value of `got` is within absmax / 127 of its block in `x` (plus `rounding` of itself)."""
    size = x.shape[-1]
    rows, got = x.reshape(-1, size), got.reshape(-1, size)
    for start in range(0, size, block):
        part = rows[:, start : start + block]
        err = (got[:, start : start + block] - part).abs()
        bound = part.abs().amax(-1, keepdim=True) / 127 + got[:, start : start + block].abs() * rounding
        assert bool((err <= bound * (1 + 1e-6)).all()), (start, (err - bound).max())


def test_int8_sends_each_rows_largest_values_apart():
    """The outlier (900) keeps float16 precision, and its block's other values get a scale of
    their own size instead of 900 / 127."""
    x = hidden((2, 5, 100))
    got = round_trip(x, INT8)
    assert got[0, 1, 3] == x[0, 1, 3].half().float()
    rest = x[0, 1].clone()
    rest[rest.abs().topk(8).indices] = 0  # what the blocks carry
    absmax = rest[:64].abs().max()  # (the outlier's block)
    assert absmax < 900 / 127 / 2
    assert (got[0, 1, :64] - x[0, 1, :64]).abs().max() <= absmax / 127


def test_int8_scales_fall_back_to_float32_where_float16_loses_them():
    x = hidden((1, 4, 128)) * 1e-6  # scales below float16's normal range
    fields, payload = encode_hidden(x, INT8)
    assert fields["scale_dtype"] == "float32"
    _check_blocks(x, decode_hidden(fields, x.dtype, list(x.shape), payload), 64)


def test_a_receiver_decodes_blocks_of_32_too():
    from peers.transport.wire import _encode_int8

    x = hidden((2, 3, 80))
    fields, payload = _encode_int8(x, 32)
    assert len(payload) == 2 * 3 * (3 * 2 + 8 * 4) + x.numel()  # 3 scales and 8 outliers a row of 80
    _check_blocks(x, decode_hidden(fields, x.dtype, list(x.shape), payload), 32)


def test_bytes_on_the_wire_halve_and_quarter():
    """A prefill frame of the default model's shape: [1, 200, 576] float32, from position 0."""
    x = hidden((1, 200, 576))
    sizes = {e: len(encode_step(replace(step(x, e), position=0))) for e in ENCODINGS}
    payload = x.numel() * 4
    assert sizes[LOSSLESS] > payload
    assert sizes[BF16] / sizes[LOSSLESS] <= 0.501
    assert len(encode_hidden(x, BF16, sampled=1)[1]) == len(encode_hidden(x, FP16)[1]) == payload / 2
    # int8: 64 values and one float16 scale per block, 8 outliers (position, value) a row of 576:
    # 626 / 2304 of float32 (0.272); the first position and the last 17 (the window and the
    # sampled one) as float16: 0.292 of this frame, tending to 0.272 as frames grow
    row = 576 + 9 * 2 + 8 * 4
    assert len(encode_hidden(x, INT8)[1]) == 200 * row
    assert len(encode_hidden(x, INT8, sampled=1, start=0)[1]) == 182 * row + 18 * 576 * 2
    assert sizes[INT8] / sizes[LOSSLESS] <= 0.294
    long = hidden((1, 2000, 576))
    assert len(encode_hidden(long, INT8, sampled=1, start=0)[1]) / (long.numel() * 4) <= 0.275


def test_token_ids_and_checked_steps_travel_lossless():
    ids = torch.tensor([[5, 6, 7]])
    assert hop_encoding(INT8, ENCODINGS, hidden=True) == INT8
    assert hop_encoding(INT8, (LOSSLESS,), hidden=True) == LOSSLESS  # the next peer did not ask for it
    assert hop_encoding(INT8, (), hidden=True) == LOSSLESS  # nor did a peer this table does not know
    assert hop_encoding(BF16, ("lossless", "fp8", "bf16"), hidden=True) == BF16
    assert hop_encoding(INT8, ENCODINGS, hidden=False) == LOSSLESS
    assert hop_encoding(LOSSLESS, ENCODINGS, hidden=True) == LOSSLESS
    assert accepted_encodings(LOSSLESS) == (LOSSLESS,) and accepted_encodings(INT8) == ENCODINGS
    with pytest.raises(ValueError, match="token"):
        accepted_encodings("token")
    with pytest.raises(ValueError, match="hidden states"):
        encode_step(step(ids, INT8))


def test_the_forwarder_compresses_only_for_peers_that_accept_it():
    """Frames actually sent: int8 to a next peer that announced it, lossless to one that did not,
    and lossless for a checked step (its commitments are digests of the exact tensor)."""
    sent = []

    def answer(request: httpx.Request) -> httpx.Response:
        reqs = decode_steps(request.content)
        sent.extend((r.hops[0].peer_id, r.wire) for r in reqs)
        return httpx.Response(200, json={"results": [{"tokens": [1], "logprobs": [-0.5]}] * len(reqs)})

    accepts = {"a" * 43: ENCODINGS, "c" * 43: (LOSSLESS,)}

    async def main():
        http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        fwd = Forwarder("me", http, 5.0, 0.01, wire=INT8, accepts=lambda p: accepts.get(p, ()))
        x = hidden((1, 80, 64))
        other = [Hop("c" * 43, "127.0.0.1:7003", 10, 20), HOPS[1]]
        await fwd.push(step(x))
        await fwd.push(replace(step(x), hops=other))
        await fwd.push(replace(step(x), verify="digest"))
        await fwd.push(replace(step(x), hops=[Hop("d" * 43, "127.0.0.1:7004", 10, 20), HOPS[1]]))
        await http.aclose()
        return fwd

    fwd = asyncio.run(main())
    assert sent == [("a" * 43, INT8), ("c" * 43, LOSSLESS), ("a" * 43, LOSSLESS), ("d" * 43, LOSSLESS)]
    assert fwd.hidden_frames == {INT8: 1, LOSSLESS: 3}
    assert fwd.hidden_bytes[INT8] * 3 < fwd.hidden_bytes[LOSSLESS]


def test_the_forwarder_counts_a_float16_fallback_as_lossless():
    def answer(request: httpx.Request) -> httpx.Response:
        n = len(decode_steps(request.content))
        return httpx.Response(200, json={"results": [{"tokens": [1], "logprobs": [-0.5]}] * n})

    async def main():
        http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        fwd = Forwarder("me", http, 5.0, 0.01, wire=FP16, accepts=lambda p: ENCODINGS)
        x = hidden((1, 4, 64))
        await fwd.push(step(x))
        x[0, 0, 0] = 1e6  # beyond float16: the frame travels lossless
        await fwd.push(step(x))
        await http.aclose()
        return fwd

    fwd = asyncio.run(main())
    assert fwd.hidden_frames == {FP16: 1, LOSSLESS: 1}


def test_an_entry_announces_the_encodings_it_accepts():
    identity = Identity.generate()
    entry = PeerRecord("", "m", 4, 0, 4, "serving", 1, 1, address="127.0.0.1:1", wire=ENCODINGS)
    entry = entry.signed(identity)
    back = PeerRecord.from_json(json.loads(json.dumps(entry.to_json())))
    assert back == entry and back.verify()
    newer = replace(entry, wire=("lossless", "fp8")).signed(identity)  # a name this version lacks
    assert PeerRecord.from_json(json.loads(json.dumps(newer.to_json()))).wire == ("lossless", "fp8")
    for bad, why in [
        ([], "1 to 8"),
        ("int8", "1 to 8"),
        (["x"] * 9, "1 to 8"),
        ([7], "a wire encoding is a name"),
        (["x" * 17], "a wire encoding is a name"),
        (["int8", "int8"], "twice"),
    ]:
        with pytest.raises(ValueError, match=why):
            PeerRecord.from_json({**entry.to_json(), "wire": bad})


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
