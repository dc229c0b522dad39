"""The compressed wire (peers/transport/wire.py): codec round trips within each encoding's error, the bytes
a frame takes and the encoding chosen per hop (hostile compressed frames: test_wire_hostile.py)."""

import asyncio
import json
from dataclasses import replace

import httpx
import pytest
import torch

from peers.swarm.identity import Identity
from peers.swarm.membership import PeerRecord
from peers.transport.forwarder import Forwarder
from peers.transport.frames import (
    Hop,
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
from tests.peers.transport.wire_samples import HOPS, hidden, round_trip, step


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
