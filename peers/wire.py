"""How hidden states cross the wire between peers (`peer serve --wire`): lossless (the tensor's
own bytes, the default), bfloat16, float16, or int8 (absmax per block of INT8_BLOCK values along
the hidden dimension, one float16 scale per block; each row's INT8_OUTLIERS largest values travel
apart, as float16 with their positions). Plain functions: `encode_hidden`/`decode_hidden` (a
frame's encoding fields and payload), and `hop_encoding` (which encoding one hop uses: the
sender's choice if the next peer announced it accepts it).

The sampled positions: under bf16 and int8 the last `sampled` positions of each sequence (those
whose logits the last peer samples: 1, or draft + 1) travel as float16 (lossless beyond its
range). Their error decides the token directly; that of the other positions reaches it only
through attention, averaged. Measured on the default model (README, scripts/bench_wire.py): with
every position bfloat16, 2 of 20 greedy runs of 64 tokens differed from the lossless wire; with
the sampled ones lossless, none did; float16 for them did as well as lossless.

A payload: the other positions [B, T - sampled, H] in the frame's encoding, then the sampled ones
[B, sampled, H] in `sampled_encoding` (fp16 or lossless). An int8 part: scales [N, ceil(H /
block)], outlier positions [N, k] (uint16, ascending), outlier values [N, k] (scales and values in
`scale_dtype`), then the int8 values [N, H] (0 where an outlier was taken out); N = its B x T
rows, little-endian throughout.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F

LOSSLESS, BF16, FP16, INT8 = "lossless", "bf16", "fp16", "int8"
ENCODINGS = (LOSSLESS, BF16, FP16, INT8)
INT8_BLOCK = 64  # values per scale (what this peer sends)
INT8_BLOCKS = (32, 64)  # block sizes a receiver decodes
# Values per row sent apart: a model's residual stream has a few channels far larger than the rest
# (SmolLM2-135M: ~130 against a median of ~2 after layer 10), and a block holding one would
# round the others to a few levels (greedy agreement with lossless, README: 25% -> 80%)
INT8_OUTLIERS = 8
MAX_OUTLIERS = 64  # what a receiver decodes
FP16_MAX = 65504.0
FP16_TINY = 2.0**-14  # the smallest normal float16: a smaller scale loses precision
_HALVES = {BF16: torch.bfloat16, FP16: torch.float16}
_SCALES = {"float16": torch.float16, "float32": torch.float32}
_INT8_FIELDS = {"block", "outliers", "scale_dtype"}
_SAMPLED_FIELDS = {"sampled", "sampled_encoding"}
_FIELDS = {LOSSLESS: set(), BF16: _SAMPLED_FIELDS, FP16: set(), INT8: _INT8_FIELDS | _SAMPLED_FIELDS}
SAMPLED_APART = (BF16, INT8)  # encodings whose sampled positions travel as float16


def accepted_encodings(wire: str) -> tuple[str, ...]:
    """What a peer announces it accepts (its gossip entry's `wire`): a peer left lossless keeps
    its inputs exact; one that chose a compressed wire accepts every encoding."""
    if wire not in ENCODINGS:
        raise ValueError(f"wire must be one of {', '.join(ENCODINGS)}, got {wire!r}")
    return (LOSSLESS,) if wire == LOSSLESS else ENCODINGS


def hop_encoding(wire: str, accepted: Iterable[str], hidden: bool) -> str:
    """The encoding of one frame: this peer's `wire` when the frame carries hidden states that
    may be lossy (`hidden`) and the next peer accepts it, else lossless."""
    return wire if hidden and wire != LOSSLESS and wire in tuple(accepted) else LOSSLESS


def encode_hidden(tensor: torch.Tensor, encoding: str, sampled: int = 0) -> tuple[dict, bytes]:
    """(the frame header's encoding fields, the payload) of `tensor`, which decodes back to the
    tensor's own dtype and shape. float16 falls back to lossless for a tensor beyond its range.
    `sampled`: under bf16 and int8, the last `sampled` positions of each sequence travel as
    float16 (see the module's doc)."""
    tensor = tensor.detach().contiguous().cpu()
    if encoding == LOSSLESS:
        return {}, _bytes(tensor)
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown wire encoding {encoding!r}; one of {', '.join(ENCODINGS)}")
    if not tensor.is_floating_point() or tensor.dim() != 3:
        raise ValueError(
            f"only hidden states [B, T, H] are compressed, not {tensor.dtype} {list(tensor.shape)}"
        )
    if encoding == FP16 and _beyond_fp16(tensor):
        return {}, _bytes(tensor)  # (inf would be refused downstream as non-finite)
    positions = tensor.shape[1]
    sampled = min(max(sampled, 0), positions) if encoding in SAMPLED_APART else 0
    head = tensor[:, : positions - sampled] if sampled else tensor
    if encoding in _HALVES:
        fields, payload = {"encoding": encoding}, _bytes(head.to(_HALVES[encoding]))
    else:
        fields, payload = _encode_int8(head, INT8_BLOCK)
    if not sampled:
        return fields, payload
    tail = tensor[:, positions - sampled :]
    exact = _beyond_fp16(tail)
    fields |= {"sampled": sampled, "sampled_encoding": LOSSLESS if exact else FP16}
    return fields, payload + _bytes(tail if exact else tail.to(torch.float16))


def _beyond_fp16(tensor: torch.Tensor) -> bool:
    return bool(tensor.numel()) and float(tensor.abs().max()) > FP16_MAX


def _encode_int8(tensor: torch.Tensor, block: int, outliers: int = INT8_OUTLIERS) -> tuple[dict, bytes]:
    hidden = tensor.shape[-1]
    k = min(outliers, hidden) if hidden <= 1 << 16 else 0
    if not tensor.numel():
        return {"encoding": INT8, "block": block, "outliers": k, "scale_dtype": "float16"}, b""
    rows = tensor.reshape(-1, hidden).float()  # [N, H]
    where = rows.abs().topk(k, dim=-1).indices.sort(-1).values  # [N, k]
    values = rows.gather(-1, where)
    x = _blocks(rows.scatter(-1, where, 0.0), block)  # [N, blocks, block]
    scale = x.abs().amax(-1) / 127  # [N, blocks]
    nonzero = scale[scale > 0]
    fits = not nonzero.numel() or (float(nonzero.min()) >= FP16_TINY and float(nonzero.max()) <= FP16_MAX)
    fits = fits and (not values.numel() or float(values.abs().max()) <= FP16_MAX)
    scale_dtype = "float16" if fits else "float32"
    scale, values = scale.to(_SCALES[scale_dtype]), values.to(_SCALES[scale_dtype])
    divisor = torch.where(scale > 0, scale.float(), 1.0)[..., None]
    # a float16 scale rounded down puts the block's absmax a hair past 127: clamped, it errs by
    # at most absmax * 2^-11
    q = (x / divisor).round().clamp(-127, 127).to(torch.int8)
    q = q.reshape(q.shape[0], -1)[:, :hidden]  # [N, H]: the padding stays behind
    fields = {"encoding": INT8, "block": block, "outliers": k, "scale_dtype": scale_dtype}
    return fields, _bytes(scale) + _bytes(where.to(torch.uint16)) + _bytes(values) + _bytes(q)


def decode_hidden(
    header: dict, dtype: torch.dtype, shape: list[int], data: bytes | bytearray
) -> torch.Tensor:
    """The tensor of a frame's payload (ValueError, naming what is wrong, for anything that does
    not fit the header: unknown encodings or fields, wrong lengths, non-finite or negative scales,
    int8 values outside [-127, 127])."""
    encoding = header.get("encoding", LOSSLESS)
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise ValueError(f"unknown wire encoding {encoding!r:.40}; one of {', '.join(ENCODINGS)}")
    extra = ((_INT8_FIELDS | _SAMPLED_FIELDS) & header.keys()) - _FIELDS[encoding]
    if extra:
        raise ValueError(f"a {encoding} frame has no {', '.join(sorted(extra))}")
    numel, data = _numel(shape), memoryview(data if isinstance(data, bytearray) else bytearray(data))
    if encoding == LOSSLESS:
        _expect(data, dtype.itemsize * numel, f"tensor of shape {shape} and dtype {_name(dtype)}")
        return _tensor(data, dtype, shape)
    if not dtype.is_floating_point or len(shape) != 3:
        raise ValueError(f"a {encoding} frame carries hidden states [B, T, H], not {_name(dtype)} {shape}")
    sampled, sampled_name = header.get("sampled", 0), header.get("sampled_encoding", FP16)
    if type(sampled) is not int or not 0 <= sampled <= shape[1]:
        raise ValueError(f"a frame's sampled positions are 0 to its {shape[1]}, got {sampled!r:.40}")
    if sampled_name not in (FP16, LOSSLESS) or ("sampled" in header) != ("sampled_encoding" in header):
        raise ValueError(
            f"a frame's sampled positions travel as {FP16} or {LOSSLESS} (sampled and "
            f"sampled_encoding together), got {sampled_name!r:.40}"
        )
    if not sampled:
        return _decode_part(header, encoding, dtype, shape, data)
    tail_type = torch.float16 if sampled_name == FP16 else dtype
    tail_shape = [shape[0], sampled, shape[2]]
    tail_bytes = tail_type.itemsize * _numel(tail_shape)
    if len(data) < tail_bytes:
        raise ValueError(f"a frame's {sampled} sampled positions need {tail_bytes} bytes, got {len(data)}")
    head = _decode_part(
        header, encoding, dtype, [shape[0], shape[1] - sampled, shape[2]], data[: len(data) - tail_bytes]
    )
    tail = _tensor(data[len(data) - tail_bytes :], tail_type, tail_shape).to(dtype)
    return torch.cat((head, tail), 1)


def _decode_part(
    header: dict, encoding: str, dtype: torch.dtype, shape: list[int], data: memoryview
) -> torch.Tensor:
    """The positions of a compressed frame's payload that travel in its `encoding`."""
    numel = _numel(shape)
    if encoding in _HALVES:
        half = _HALVES[encoding]
        _expect(data, half.itemsize * numel, f"{encoding} tensor of shape {shape}")
        return _tensor(data, half, shape).to(dtype)
    block, k, scale_name = header.get("block"), header.get("outliers"), header.get("scale_dtype")
    if type(block) is not int or block not in INT8_BLOCKS:
        raise ValueError(f"an int8 frame's block is one of {INT8_BLOCKS}, got {block!r:.40}")
    if type(k) is not int or not 0 <= k <= min(MAX_OUTLIERS, shape[-1]):
        raise ValueError(
            f"an int8 frame's outliers are 0 to {MAX_OUTLIERS} per row of {shape[-1]}, got {k!r:.40}"
        )
    if not isinstance(scale_name, str) or scale_name not in _SCALES:
        raise ValueError(
            f"an int8 frame's scale_dtype is one of {', '.join(_SCALES)}, got {scale_name!r:.40}"
        )
    scale_type, hidden = _SCALES[scale_name], shape[-1]
    rows, blocks = _numel(shape[:-1]), -(-hidden // block)
    parts = [rows * blocks * scale_type.itemsize, rows * k * 2, rows * k * scale_type.itemsize, numel]
    what = f"int8 tensor of shape {shape} with {scale_name} scales per {block} and {k} outliers a row"
    _expect(data, sum(parts), what)
    if not numel:
        return torch.empty(shape, dtype=dtype)
    ends = [sum(parts[: i + 1]) for i in range(4)]
    scale = _tensor(data[: ends[0]], scale_type, [rows, blocks]).float()
    where = _tensor(data[ends[0] : ends[1]], torch.uint16, [rows, k]).long()
    values = _tensor(data[ends[1] : ends[2]], scale_type, [rows, k]).float()
    q = _tensor(data[ends[2] :], torch.int8, [rows, hidden])
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError("an int8 frame's scales must be finite and >= 0")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("an int8 frame's outliers must be finite")
    if k and (bool((where.diff(dim=-1) <= 0).any()) or bool((where[:, -1] >= hidden).any())):
        raise ValueError(f"an int8 frame's outlier positions ascend within [0, {hidden}) in each row")
    if bool((q == -128).any()):
        raise ValueError("an int8 frame's values are in [-127, 127]")
    x = _blocks(q.float(), block) * scale[..., None]  # [N, blocks, block]
    x = x.reshape(rows, -1)[:, :hidden].scatter(-1, where, values)
    return x.reshape(shape).to(dtype)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[N, H] -> [N, ceil(H / block), block], the last block padded with zeros."""
    pad = -x.shape[1] % block
    return F.pad(x, (0, pad)).reshape(x.shape[0], -1, block)


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _tensor(data: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not len(data):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)


def _expect(data, expected: int, what: str) -> None:
    if len(data) != expected:
        raise ValueError(f"{what} needs {expected} bytes, got {len(data)}")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
