"""How hidden states cross the wire between peers (`peer serve --wire`): lossless (the tensor's
own bytes, the default), bfloat16, float16, or int8 (absmax per block of INT8_BLOCK values along
the hidden dimension, one float16 scale per block; each row's INT8_OUTLIERS largest values travel
apart, as float16 with their positions). Plain functions: `encode_hidden`/`decode_hidden` (a
frame's encoding fields and payload), and `hop_encoding` (which encoding one hop uses: the
sender's choice if the next peer announced it accepts it).

A frame's edges: under bf16 and int8, some positions of each sequence travel as float16 (lossless
beyond its range): the last `sampled` ones (those whose logits the last peer samples: 1, or
draft + 1), and under int8 also the INT8_WINDOW before them and, in a frame that starts the
sequence, its first position. Why these: a sampled position's error moves its token directly,
the others' only through attention; and int8's larger error matters most where attention looks
most, at the first position (the "attention sink" every later one attends to, with far larger
values than the rest) and the positions nearest the sampled one. During decoding every new
position is sampled, so int8 carries only the older context. README, "A compressed wire", has
the measurements behind these choices (scripts/bench_wire.py).

A payload: the first `head` positions [B, head, H] and the last `tail` ones [B, tail, H] in
`edge_encoding` (fp16 or lossless), and between them the others [B, T - head - tail, H] in the
frame's encoding: middle, then head, then tail. An int8 part: scales [N, ceil(H / block)], outlier
positions [N, k] (uint16, ascending), outlier values [N, k] (scales and values in `scale_dtype`),
then the int8 values [N, H] (0 where an outlier was taken out); N = its rows, little-endian
throughout.
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
_EDGE_FIELDS = {"head", "tail", "edge_encoding"}
_FIELDS = {LOSSLESS: set(), BF16: _EDGE_FIELDS, FP16: set(), INT8: _INT8_FIELDS | _EDGE_FIELDS}
EDGES_APART = (BF16, INT8)  # encodings whose edge positions travel as float16
INT8_WINDOW = 16  # under int8, positions before the sampled ones that travel as float16 too
INT8_SINK = 1  # under int8, a sequence's first positions that travel as float16


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


def encode_hidden(
    tensor: torch.Tensor, encoding: str, sampled: int = 0, start: int | None = None
) -> tuple[dict, bytes]:
    """(the frame header's encoding fields, the payload) of `tensor`, which decodes back to the
    tensor's own dtype and shape. float16 falls back to lossless for a tensor beyond its range.
    `sampled`: how many last positions of each sequence the last peer samples from; `start`: the
    sequence position of the tensor's first (0: the frame starts its sequences). They decide the
    edges that travel as float16: `sampled` under bf16 and int8, `start` under int8 (see the
    module's doc)."""
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
    head, tail = _edges(encoding, tensor.shape[1], sampled, start)
    middle = tensor[:, head : tensor.shape[1] - tail]
    if encoding in _HALVES:
        fields, payload = {"encoding": encoding}, _bytes(middle.to(_HALVES[encoding]))
    else:
        fields, payload = _encode_int8(middle, INT8_BLOCK)
    if not head + tail:
        return fields, payload
    ends = torch.cat((tensor[:, :head], tensor[:, tensor.shape[1] - tail :]), 1)
    exact = _beyond_fp16(ends)
    fields |= {"head": head, "tail": tail, "edge_encoding": LOSSLESS if exact else FP16}
    return fields, payload + _bytes(ends if exact else ends.to(torch.float16))


def _edges(encoding: str, positions: int, sampled: int, start: int | None) -> tuple[int, int]:
    """(head, tail): how many first and last positions of each sequence of a frame of
    `positions` travel as float16 under `encoding`."""
    if encoding not in EDGES_APART:
        return 0, 0
    tail = min(max(sampled, 0) + (INT8_WINDOW if encoding == INT8 and sampled > 0 else 0), positions)
    head = min(INT8_SINK, positions - tail) if encoding == INT8 and start == 0 else 0
    return head, tail


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
    extra = ((_INT8_FIELDS | _EDGE_FIELDS) & header.keys()) - _FIELDS[encoding]
    if extra:
        raise ValueError(f"a {encoding} frame has no {', '.join(sorted(extra))}")
    numel, data = _numel(shape), memoryview(data if isinstance(data, bytearray) else bytearray(data))
    if encoding == LOSSLESS:
        _expect(data, dtype.itemsize * numel, f"tensor of shape {shape} and dtype {_name(dtype)}")
        return _tensor(data, dtype, shape)
    if not dtype.is_floating_point or len(shape) != 3:
        raise ValueError(f"a {encoding} frame carries hidden states [B, T, H], not {_name(dtype)} {shape}")
    head, tail = header.get("head", 0), header.get("tail", 0)
    edge_name = header.get("edge_encoding", FP16)
    for name, count in (("head", head), ("tail", tail)):
        if type(count) is not int or not 0 <= count <= shape[1]:
            raise ValueError(f"a frame's {name} is 0 to its {shape[1]} positions, got {count!r:.40}")
    if head + tail > shape[1]:
        raise ValueError(f"a frame's head and tail ({head} + {tail}) exceed its {shape[1]} positions")
    given = {"head", "tail", "edge_encoding"} & header.keys()
    if edge_name not in (FP16, LOSSLESS) or given not in (set(), {"head", "tail", "edge_encoding"}):
        raise ValueError(
            f"a frame's edges travel as {FP16} or {LOSSLESS} (head, tail and edge_encoding "
            f"together), got {edge_name!r:.40}"
        )
    if not head + tail:
        return _decode_part(header, encoding, dtype, shape, data)
    edge_type = torch.float16 if edge_name == FP16 else dtype
    edge_shape = [shape[0], head + tail, shape[2]]
    edge_bytes = edge_type.itemsize * _numel(edge_shape)
    if len(data) < edge_bytes:
        raise ValueError(f"a frame's {head + tail} edge positions need {edge_bytes} bytes, got {len(data)}")
    middle = _decode_part(
        header, encoding, dtype, [shape[0], shape[1] - head - tail, shape[2]], data[: len(data) - edge_bytes]
    )
    ends = _tensor(data[len(data) - edge_bytes :], edge_type, edge_shape).to(dtype)
    return torch.cat((ends[:, :head], middle, ends[:, head:]), 1)


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
