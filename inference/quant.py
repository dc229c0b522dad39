"""Weight-only quantization of a block (`--quant int8|int4`), and the bytes a module's weights
hold in memory.

int8: integers per group of 32 weights with a float scale and offset each (GroupQuantized), per
group the better of the absmax grid and the min/max grid; a matmul dequantizes a slice of rows
at a time. It holds weights that sit on GGUF's Q8_0 and Q4_x grids (the default model's) again,
Q8_0 bit for bit and Q4_x up to float32 rounding.
int4: torchao's int4 weight-only tensors and kernels (tinygemm, in bfloat16) for linear layers;
the embedding as GroupQuantized int4. An embedding lookup dequantizes only its rows.
Mixture-of-experts weights (3-D, one slice per expert) are GroupQuantized in both modes, and an
expert's slice is dequantized when the family's forward indexes it (QuantizedExperts).
"""

import copy
import ctypes
import ctypes.util
import logging

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("none", "int8", "int4")
# weights per scale and offset: the block of GGUF's Q8_0/Q4_0/Q4_1; torchao's CPU int4 takes 32-128
GROUP = 32
INT4_DTYPE = torch.bfloat16  # what torchao's int4 kernels (CPU and CUDA tinygemm) compute in
INT4_CPU_ROWS = 16  # torchao's CPU int4 packs output rows by 16
CHUNK_ROWS = 1024  # rows quantized at a time at load: the copies stay small
CHUNK_WEIGHTS = 1 << 18  # weights a matmul dequantizes at a time (1 MB in float32: in cache)

log = logging.getLogger("layerswarm.inference")


class _DropNoise(logging.Filter):
    """Drops log records that start with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# Importing torchao (transformers does, whenever it is installed) logs that its CUDA-only
# extensions do not load on a CPU build, and torch warns about how torchao registers two enums:
# harmless on every start, and LayerSwarm uses neither.
logging.getLogger("torchao").addFilter(_DropNoise("Failed to load ", "Skipping import of cpp extensions"))
logging.getLogger("torch.utils._pytree").addFilter(_DropNoise("%s is an Enum subclass"))


def check_quant(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ValueError(f"quant must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    return mode


def bytes_per_weight(mode: str, dtype: torch.dtype) -> float:
    """About how many bytes one weight of a linear layer or an expert holds under `mode` (for layer
    choice and `peer plan`)."""
    if check_quant(mode) == "int8":
        return 1 + 2 * 4 / GROUP  # a float32 scale and offset per group
    if mode == "int4":
        return 0.5 + 2 * INT4_DTYPE.itemsize / GROUP  # two a byte, torchao's bfloat16 scale and zero
    return dtype.itemsize


class GroupQuantized(nn.Module):
    """A weight [N, K] held as integers q per group of `group` weights along K, with a scale and
    an offset per group: weight = q * scale + low. 8 bits: q in 0..255, per group the absmax grid
    (low = -128 * scale) or the min/max grid, whichever is closer; 4 bits: min/max, q in 0..15
    two a byte."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        assert bits in (4, 8), bits
        rows, cols = weight.shape
        self.bits, self.shape, self.dtype = bits, (rows, cols), weight.dtype
        self.group = GROUP if cols % GROUP == 0 else cols  # else one group a row
        if bits == 4 and cols % 2:
            raise ValueError(f"int4 packs two weights a byte: a row of {cols} is odd")
        parts = [self._quantize(w) for w in weight.detach().split(CHUNK_ROWS)]
        q, scale, low = (torch.cat(p) for p in zip(*parts, strict=True))
        self.register_buffer("q", q)  # [N, K] uint8, or [N, K/2] two 4-bit values a byte
        self.register_buffer("scale", scale)  # [N, K/group]
        self.register_buffer("low", low)  # [N, K/group]

    def _quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = w.float().view(w.shape[0], -1, self.group)  # [n, G, g]
        top = 2**self.bits - 1
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        scale = ((high - low) / top).clamp(min=1e-30)  # min/max grid
        q = torch.round((x - low) / scale).clamp(0, top)
        if self.bits == 8:  # the absmax grid; q - 128 in -127..127
            scale2 = (torch.maximum(-low, high) / 127).clamp(min=1e-30)
            q2 = torch.round(x / scale2).clamp(-127, 127) + 128
            low2 = -128 * scale2
            worse = (q * scale + low - x).abs().amax(-1, keepdim=True)
            better = (q2 * scale2 + low2 - x).abs().amax(-1, keepdim=True) < worse  # [n, G, 1]
            q, scale, low = (torch.where(better, b, a) for a, b in ((q, q2), (scale, scale2), (low, low2)))
        q = q.to(torch.uint8).view(w.shape[0], -1)  # [n, K]
        if self.bits == 4:
            q = q[:, 0::2] | (q[:, 1::2] << 4)  # [n, K/2]
        kept = torch.float32 if self.bits == 8 else torch.float16  # exact grids need float32
        return q, scale.squeeze(-1).to(kept), low.squeeze(-1).to(kept)

    def values(self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Dequantize rows: q [..., K] (or [..., K/2] packed), scale and low [..., G] -> [..., K]."""
        if self.bits == 4:
            q = torch.stack((q & 15, q >> 4), -1)  # [..., K/2, 2]
        x = q.float().view(*q.shape[: -2 if self.bits == 4 else -1], -1, self.group)  # [..., G, g]
        x.mul_(scale.float()[..., None]).add_(low.float()[..., None])
        return x.flatten(-2).to(self.dtype)  # [..., K]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows `ids` [...] -> [..., K] (an embedding lookup)."""
        return self.values(self.q[ids], self.scale[ids], self.low[ids])

    def dequantize(self, start: int, end: int) -> torch.Tensor:
        """Rows start..end, dequantized [end - start, K]."""
        return self.values(self.q[start:end], self.scale[start:end], self.low[start:end])

    def extra_repr(self) -> str:
        return f"{self.shape[0]}, {self.shape[1]}, bits={self.bits}, group={self.group}"


class GroupLinear(nn.Module):
    """A linear layer over a GroupQuantized weight: dequantizes CHUNK_WEIGHTS weights' worth of
    output rows at a time (the copy stays small, in cache) and multiplies in the input's dtype."""

    def __init__(self, weight: GroupQuantized, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, step = self.out_features, max(1, CHUNK_WEIGHTS // self.in_features)
        outs = [
            F.linear(x, self.weight.dequantize(start, min(rows, start + step)).to(x.dtype))
            for start in range(0, rows, step)
        ]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, -1)  # [..., out]
        return y if self.bias is None else y + self.bias


class TorchAOLinear(nn.Module):
    """A linear layer whose weight torchao holds quantized; it computes in `compute_dtype` (that of
    its kernel) and answers in its input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(self.compute_dtype), self.weight).to(x.dtype)  # [..., out]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={type(self.weight).__name__}"


class QuantizedEmbedding(nn.Module):
    """An embedding over a GroupQuantized table: a lookup dequantizes only its rows (torchao's
    quantized tensors dequantize the whole table on every lookup)."""

    def __init__(self, weight: GroupQuantized):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids)  # [..., H]


class QuantizedExperts(nn.Module):
    """A mixture of experts' 3-D weight [E, N, K] held GroupQuantized row by row (expert e is rows
    e*N..(e+1)*N of [E*N, K]), indexed as the family's forward indexes the float one: `w[e]`
    dequantizes expert e [N, K], `w[ids]` the experts ids [S] -> [S, N, K]."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        experts, rows, cols = weight.shape
        self.shape, self.dtype = weight.shape, weight.dtype
        if bits == 4 and cols % 2:
            raise ValueError(
                f"int4 packs two weights a byte: experts of {tuple(weight.shape)} have rows of an odd length"
            )
        self.weight = GroupQuantized(weight.detach().reshape(experts * rows, cols), bits)

    def __getitem__(self, idx) -> torch.Tensor:
        w, (experts, rows) = self.weight, self.shape[:2]
        q, scale, low = (t.view(experts, rows, -1)[idx] for t in (w.q, w.scale, w.low))
        return w.values(q, scale, low)  # [N, K] or [S, N, K]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight.q.device

    def extra_repr(self) -> str:
        return f"{', '.join(map(str, self.shape))}, bits={self.weight.bits}, group={self.weight.group}"


def expert_weights(module: nn.Module) -> list[str]:
    """The names of `module`'s own 3-D parameters with one slice per expert ([E, ...] with
    E = module.num_experts): a transformers `...Experts` module's gate_up_proj and down_proj."""
    experts = getattr(module, "num_experts", None)
    return [
        name for name, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == experts
    ]


def quantize_experts(module: nn.Module, mode: str) -> bool:
    """Quantize an experts module's 3-D weights in place (biases stay float); False if it holds none
    or if its forward reads every expert at once (it then stays float). Its forward becomes the
    family's eager one, which indexes one expert at a time: transformers' grouped_mm and batched_mm
    read the whole tensor, or a copy of the chosen experts per token."""
    names = expert_weights(module)
    if check_quant(mode) == "none" or not names:
        return False
    if not hasattr(module, "is_transposed"):  # not @use_experts_implementation: its own forward
        log.warning("the experts of %s stay float: its forward reads them all at once", type(module).__name__)
        return False
    for name in names:
        weight = getattr(module, name)
        delattr(module, name)
        setattr(module, name, QuantizedExperts(weight, 8 if mode == "int8" else 4))
    module.config = copy.copy(module.config)  # this module's own: the model's keeps its choice
    module.config._experts_implementation = "eager"
    return True


def quantize_linear(linear: nn.Linear, mode: str) -> nn.Module:
    """`linear` with its weight quantized: int8 as GroupQuantized; int4 by torchao per group of
    GROUP inputs, in bfloat16 (CPU tinygemm on a CPU, the tile-packed tinygemm layout on CUDA).
    `none` gives it back as it is."""
    if check_quant(mode) == "none":
        return linear
    weight, bias = linear.weight.detach(), linear.bias
    if mode == "int8":
        return GroupLinear(GroupQuantized(weight, 8), bias)
    ao = _torchao()
    out_features, in_features = weight.shape
    cuda = weight.device.type == "cuda"
    if in_features % GROUP or (not cuda and out_features % INT4_CPU_ROWS):
        raise ValueError(
            f"int4 needs a linear layer's inputs in groups of {GROUP}"
            + ("" if cuda else f" and its outputs in multiples of {INT4_CPU_ROWS}")
            + f"; this one is {in_features} -> {out_features}"
        )
    holder = nn.Linear(in_features, out_features, bias=False, device="meta")
    holder.weight = nn.Parameter(weight.to(INT4_DTYPE), requires_grad=False)
    if cuda:  # tinygemm's tensor-core layout (torch's _weight_int4pack_mm)
        config = ao.Int4WeightOnlyConfig(
            group_size=GROUP, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )
    else:  # torch's _weight_int4pack_mm_for_cpu
        config = ao.PrototypeInt4WeightOnlyConfig(group_size=GROUP, set_inductor_config=False)
    ao.quantize_(holder, config)
    return TorchAOLinear(holder.weight.data, bias, INT4_DTYPE)


def quantize_linears(module: nn.Module, mode: str) -> None:
    """Replace every nn.Linear inside `module` (one decoder layer, say) by its quantized form, and
    quantize the experts' 3-D weights of a mixture of experts (quantize_experts)."""
    if check_quant(mode) == "none":
        return
    quantize_experts(module, mode)
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, quantize_linear(child, mode))
        elif not isinstance(child, QuantizedExperts):
            quantize_linears(child, mode)


def quantize_block(block: nn.Module, mode: str) -> None:
    """Quantize a loaded block in place: its decoder layers' linear layers, and its lm_head and
    embedding where it holds them. Tied ones stay one tensor under int8; under int4 the lm_head
    is torchao's and the embedding GroupQuantized. Parts already quantized stay as they are."""
    if check_quant(mode) == "none":
        return
    for layer in block.layers:
        quantize_linears(layer, mode)
    head = getattr(block, "lm_head", None)
    embedding = getattr(block, "embed_tokens", None)
    table = None
    if isinstance(embedding, nn.Embedding):
        table = GroupQuantized(embedding.weight, 8 if mode == "int8" else 4)
        block.embed_tokens = QuantizedEmbedding(table)
    if isinstance(head, nn.Linear):
        tied = embedding is not None and head.weight is getattr(embedding, "weight", None)
        if tied and mode == "int8":
            block.lm_head = GroupLinear(table, head.bias)
        else:
            block.lm_head = quantize_linear(head, mode)


def release_freed_memory() -> None:
    """Hand the pages of freed heap memory back to the system (glibc's malloc_trim; elsewhere
    nothing). Quantizing a layer frees its float copies, and glibc keeps freed blocks of a few MB
    in the heap, fragmented: without this a peer's memory after loading would be its float
    layers' temporaries, not its quantized weights."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC: ctypes.CDLL | bool | None = None


def weights_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s weights as held in memory: its parameters and persistent buffers, a
    quantized tensor as its integer data plus scales and zeros, a tensor shared by two names once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():
        for t in _plain_tensors(tensor):
            key = (t.data_ptr(), t.nbytes)
            if key not in seen:
                seen.add(key)
                total += t.nbytes
    return total


def _plain_tensors(t: torch.Tensor):
    """The plain tensors holding `t`'s data (a tensor subclass such as torchao's: its parts)."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        yield t
        return
    names, _ = t.__tensor_flatten__()
    for name in names:
        yield from _plain_tensors(getattr(t, name))


class _TorchAO:
    """torchao's entry points, imported on first use."""

    def __init__(self):
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        self.quantize_ = quantize_
        self.Int4WeightOnlyConfig = Int4WeightOnlyConfig
        self.PrototypeInt4WeightOnlyConfig = PrototypeInt4WeightOnlyConfig


_AO: _TorchAO | None = None


def _torchao() -> _TorchAO:
    global _AO
    if _AO is None:
        _AO = _TorchAO()
    return _AO
