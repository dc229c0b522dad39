"""A block: layers [start, end) of a decoder, holding only its own weights, run per session with
that session's KV cache. The first block embeds token ids; the last applies the final norm and
lm_head and returns logits."""

import logging
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .architectures import family_parts, get_family, layer_type, sliding_window
from .batch import ATTENTION, BatchCache, Segment, Step
from .cuda_graphs import DecodeGraphs, GraphSettings, graph_problem
from .errors import InferenceError, LayerRangeError, ModelNotFoundError
from .expert_weights import locate
from .kv_cache import LOCAL, CacheStore, Sender, SessionCache
from .kv_slots import eager_pool_shape
from .prefix_cache import PrefixCache
from .quant import check_quant, quantize_block, quantize_linears, release_freed_memory
from .sessions import Sessions
from .weights import Checkpoint, open_checkpoint

_LOADING = threading.Lock()
log = logging.getLogger("layerswarm.inference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Span:
    """Layers [start, end) of a model with `total` layers."""

    start: int
    end: int
    total: int

    def __post_init__(self):
        if not 0 <= self.start < self.end <= self.total:
            raise LayerRangeError(
                f"layers {self.start}:{self.end} are not a non-empty range inside [0, {self.total})"
            )

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.total

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


def parse_span(text: str, total: int) -> Span:
    """'A:B' -> Span(A, B, total); a clear LayerRangeError otherwise."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise LayerRangeError(f"layer range {text!r} is not of the form START:END, e.g. 0:10") from None
    return Span(start, end, total)


def resolve_device(
    device: str | None, dtype: str | None, checkpoint_dtype: torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """CPU float32 by default; cuda defaults to the checkpoint's own float16 or bfloat16, else
    bfloat16."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    if dtype is None and dev.type == "cuda":
        return dev, checkpoint_dtype if checkpoint_dtype in (
            torch.float16,
            torch.bfloat16,
        ) else torch.bfloat16
    if dtype is None:
        return dev, torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dev, DTYPES[dtype]


def load_config(path: Path) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot read the model config in {path}: {e}") from e
    get_family(config)  # unsupported architectures fail here, before any weight is read
    config._attn_implementation = ATTENTION  # varlen attention over many sessions' caches
    return config


class Block(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        span: Span,
        max_cache_tokens: int,
        idle_timeout_s: float,
        prefix_cache_tokens: int = 0,
    ):
        super().__init__()
        self.family = get_family(config)
        self.config, self.span = config, span
        parts = family_parts(config, span.start, span.end)
        if span.is_first:
            self.embed_tokens = parts["embed_tokens"]  # the family's own (Gemma 3 scales it)
        self.layers = nn.ModuleList(parts["layers"])
        if span.is_last:
            self.norm = parts["norm"]
            with init_empty_weights():  # its own tensor; tied to the embedding below where one is held
                self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = parts["rotary"]  # a few buffers, computed here, not loaded
        rope = getattr(self.rotary, "rope_type", "default")
        self.rope_by_type = isinstance(rope, dict)  # one rotary embedding per layer type (Gemma 3)
        # a rotary embedding that depends on the sequence's length, computed per sequence (longrope)
        self.rope_per_sequence = "longrope" in (rope.values() if self.rope_by_type else [rope])
        self.final_softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 3
        self.keep_fp32 = parts["keep_fp32"]  # (always, in float16) name parts held in float32
        self.windows = [sliding_window(config, i) for i in range(span.start, span.end)]
        self.layer_types = [layer_type(config, i) for i in range(span.start, span.end)]
        self.rope_kinds = sorted(set(self.layer_types))
        self.latent = frozenset(  # layers caching a compressed latent (multi-head latent attention)
            layer.self_attn.layer_idx
            for layer in self.layers
            if hasattr(layer.self_attn, "kv_a_proj_with_mqa")
        )
        # the sessions' KV caches, the prefix cache and the decode-graph binding (inference/sessions.py)
        self.kv = Sessions(
            (span.start, span.end),
            config.hidden_size,
            config.vocab_size,
            max_cache_tokens,
            idle_timeout_s,
            prefix_cache_tokens,
        )
        self.quant = "none"  # weight-only quantization (inference/quant.py), set by load_weights
        self._dtype = torch.float32  # what the block computes in, set by load_weights

    @property
    def device(self) -> torch.device:
        return next(self.rotary.buffers()).device  # (Gemma 3's holds one inv_freq per layer type)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype  # (not a parameter's: a quantized weight may report its kernel's dtype)

    def position_embeddings(self, hidden: torch.Tensor, pos: torch.Tensor, lengths: list[int]) -> dict:
        """cos and sin for the flat batch's positions, per layer type. A rotary embedding that
        depends on the sequence's length (longrope) is computed per sequence, as alone."""

        def embed(kind: str):
            args = (kind,) if self.rope_by_type else ()
            if not self.rope_per_sequence or len(lengths) == 1:
                return self.rotary(hidden, pos, *args)
            parts = [
                self.rotary(h, p, *args)
                for h, p in zip(hidden.split(lengths, 1), pos.split(lengths, 1), strict=True)
            ]
            return tuple(torch.cat(t, dim=1) for t in zip(*parts, strict=True))

        return {kind: embed(kind) for kind in self.rope_kinds}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the last layer's hidden states: the final norm, lm_head and, where the
        family has it, final soft-capping."""
        logits = self.lm_head(self.norm(hidden)).float()
        cap = self.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def dtype_of(self, name: str) -> torch.dtype:
        """What a tensor is held in: the block's dtype, but float32 for what the family keeps in
        float32 (routers' weights and correction biases; in float16, GPT-OSS's norms),
        as transformers loads them."""
        keep = list(self.keep_fp32[0]) + (list(self.keep_fp32[1]) if self._dtype == torch.float16 else [])
        if any(f".{pattern}." in f".{name}." for pattern in keep):
            return torch.float32
        return self._dtype

    def checkpoint_names(self, checkpoint: Checkpoint) -> dict[str, str]:
        """Block tensor name -> checkpoint tensor name, for this block's share only: parameters
        and persistent buffers (DeepSeek-V3's and GLM-4.5's routers keep a correction bias so)."""
        names = {}
        for name in self.state_dict(keep_vars=True):
            if name.startswith("layers."):
                _, local, rest = name.split(".", 2)
                names[name] = f"model.layers.{self.span.start + int(local)}.{rest}"
            elif name == "lm_head.weight" and "lm_head.weight" not in checkpoint:
                names[name] = "model.embed_tokens.weight"  # tied embeddings
            elif name == "lm_head.weight":
                names[name] = name
            else:
                names[name] = f"model.{name}"
        return names

    def load_weights(
        self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, quant: str = "none"
    ) -> None:
        """Read this block's tensors one decoder layer at a time, quantizing each layer as it
        arrives (`quant`): memory holds one layer in `dtype` beyond the quantized rest."""
        names = self.checkpoint_names(checkpoint)
        self.quant, self._dtype = check_quant(quant), dtype
        parts: dict[int, list[str]] = {}  # local layer index -> its parameters; -1: the others
        for name in names:
            parts.setdefault(int(name.split(".")[1]) if name.startswith("layers.") else -1, []).append(name)
        for part, part_names in sorted(parts.items(), key=lambda item: item[0] < 0):
            reads = {name: locate(names[name], checkpoint) for name in part_names}
            tensors = checkpoint.read(sorted({source for read in reads.values() for source in read.names}))
            state = {
                name: read.combine([tensors[n] for n in read.names]).to(
                    device=device, dtype=self.dtype_of(name)
                )
                for name, read in reads.items()
            }
            if quant != "none":  # what stays float leaves the file's memory map, which then closes
                state = {name: t if t.dim() > 1 else t.clone() for name, t in state.items()}
            self.load_state_dict(state, strict=False, assign=True)
            del tensors, state
            if part >= 0:
                quantize_linears(self.layers[part], quant)
            if quant != "none":
                release_freed_memory()  # the layer's float copies: memory stays near the quantized size
        if (
            self.span.is_first
            and self.span.is_last
            and names["lm_head.weight"] == "model.embed_tokens.weight"
        ):
            self.lm_head.weight = self.embed_tokens.weight  # one tensor, as in the whole model
        quantize_block(self, quant)  # the lm_head and the embedding; the layers are done
        if quant != "none":
            release_freed_memory()
        for module in self.modules():  # buffers computed at build time (rotary, embedding scale)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.device != device:
                    setattr(module, name, buffer.to(device))
        missing = [n for n, p in self.named_parameters() if p.is_meta]
        assert not missing, f"parameters left unloaded: {missing}"

    def enable_decode_graphs(self, settings: GraphSettings | None = None, capture: bool = True) -> bool:
        """Decode steps through static KV slots, captured as CUDA graphs (inference/cuda_graphs.py;
        with capture False, the same static step runs eagerly). False if this block cannot."""
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this block runs on {self.device}")
        problem = graph_problem(self)
        if problem:
            log.warning("decode steps of layers %s are not captured: %s", self.span, problem)
            return False
        self.graphs = DecodeGraphs(self, settings or GraphSettings(), capture)  # (a pool of its own)
        return True

    @property
    def sessions(self) -> CacheStore:
        """The KV caches of this block's sessions."""
        return self.kv.store

    @property
    def prefixes(self) -> PrefixCache:
        """The KV of prompt prefixes kept for later requests."""
        return self.kv.prefixes

    @property
    def graphs(self) -> DecodeGraphs | None:
        """Captured decode steps (enable_decode_graphs); None when off."""
        return self.kv.graphs

    @graphs.setter
    def graphs(self, graphs: DecodeGraphs | None) -> None:
        self.kv.graphs = graphs

    def open_sessions(self) -> int:
        return len(self.kv)

    def close(self, session_id: str) -> bool:
        return self.kv.close(session_id)

    def restore_prefix(
        self,
        session_id: str,
        layers: tuple[int, int],
        prefix: tuple[int, ...],
        position: int,
        steps: int,
        sender: Sender = LOCAL,
    ) -> int:
        """Open a step's session from the prefix cache where it holds the step's leading blocks
        (Sessions.restore_prefix), counted against `sender`; returns how many leading positions
        need no computing."""
        return self.kv.restore_prefix(session_id, layers, prefix, position, steps, sender)

    def store_prefix(self, session_id: str, prefix: tuple[int, ...]) -> None:
        """Keep the KV of a session's leading prompt blocks for later requests."""
        self.kv.store_prefix(session_id, prefix)

    @torch.inference_mode()
    def forward(
        self,
        session_id: str,
        inputs: torch.Tensor,
        position: int,
        last_only: bool = True,
        layers: tuple[int, int] | None = None,
        rewind: bool = False,
    ) -> torch.Tensor:
        """Run one step of one session: prefill (T > 1) or decode (T = 1).

        inputs: token ids [B, T] when the step starts at layer 0, hidden states [B, T, H] otherwise.
        position: index of the first of the T positions; what the session has cached (0 opens
        the session). After a drafted step (Step.drafted) it may start inside that step's
        positions, past its first: the rest are dropped (rejected drafts); with `rewind`, at any
        earlier position (a caller's own session, e.g. a draft model's).
        layers: the global layers [a, b) to run, a part of this block's
        span (all of it by default); fixed for the session's life. Returns hidden states
        [B, T, H], or float32 logits [B, T', V] when b is the model's last layer (T' = 1 if
        last_only).
        """
        (out,) = self.forward_batch([Step(session_id, inputs, position, layers, last_only, rewind=rewind)])
        if isinstance(out, Exception):
            raise out
        return out

    @torch.inference_mode()
    def forward_batch(self, steps: list[Step]) -> list[torch.Tensor | Exception]:
        """Run the steps of many sessions together: one forward per layer range among them.

        Returns, per step, its output (as `forward`) or the error that refused it (SessionError,
        CacheFullError, ValueError); a refused step leaves the others untouched.
        """
        results: list[torch.Tensor | Exception | None] = [None] * len(steps)
        groups: dict[tuple[int, int], list[tuple[int, Step, SessionCache]]] = {}
        seen: set[str] = set()
        self.kv.expire()
        for i, step in enumerate(steps):
            try:
                layers = self.kv.check(step, seen)
                groups.setdefault(layers, []).append((i, step, self.kv.session_for(step, layers)))
                seen.add(step.session_id)
            except (InferenceError, ValueError) as e:
                results[i] = e
        for (start, end), items in groups.items():
            try:
                pairs = [(step, session) for _, step, session in items]
                if self.graphs is None:
                    outs = self._run(start, end, pairs)
                else:
                    outs = self.graphs.forward((start, end), pairs, partial(self._run, start, end))
            except Exception as e:  # a bug or a torch error: every step of this forward failed
                for _, step, _ in items:
                    if step.position == 0:
                        self.sessions.close(step.session_id)
                outs = [e] * len(items)
            for (i, _, _), out in zip(items, outs, strict=True):
                results[i] = out
        return results

    def _run(self, start: int, end: int, items: list[tuple[Step, SessionCache]]) -> list[torch.Tensor]:
        segments, flat, positions, lengths, offset, device = [], [], [], [], 0, self.device
        for step, session in items:
            batch, steps = step.inputs.shape[:2]
            for row in range(batch):
                segments.append(Segment(session, row, offset, steps, session.length))
                offset += steps
            x = step.inputs.to(device)
            flat.append(
                x.reshape(batch * steps) if start == 0 else x.reshape(batch * steps, -1).to(self.dtype)
            )
            positions.extend(list(range(session.length, session.length + steps)) * batch)
            lengths.append(batch * steps)
        x = torch.cat(flat)[None]  # [1, N] ids or [1, N, H]
        pos = torch.tensor(positions, device=device)[None]  # [1, N]
        hidden = self.embed_tokens(x) if start == 0 else x  # [1, N, H]
        cos_sin = self.position_embeddings(hidden, pos, lengths)
        local = slice(start - self.span.start, end - self.span.start)
        windows = dict(zip(range(start, end), self.windows[local], strict=True))
        cache = BatchCache(segments, windows, self.latent, self.kv.pool)
        for layer, kind in zip(self.layers[local], self.layer_types[local], strict=True):
            hidden = layer(
                hidden,
                position_ids=pos,
                cache=cache,
                use_cache=True,
                position_embeddings=cos_sin[kind],
                batch=cache,
            )
        missing = sorted(set(range(start, end)) - cache.updated)
        if missing:
            raise RuntimeError(f"layers {missing} ran without this step's KV cache")
        outs, offset = [], 0
        for step, session in items:
            batch, steps = step.inputs.shape[:2]
            outs.append(hidden[0, offset : offset + batch * steps].view(batch, steps, -1))
            offset += batch * steps
            session.advance(steps)
            session.rewind_floor = step.position + 1 if step.drafted else None
        if end < self.span.total:
            return outs  # hidden states [B, T, H] each
        picked = [h[:, -1:] if step.last_only else h for h, (step, _) in zip(outs, items, strict=True)]
        shapes = [p.shape[:2] for p in picked]
        logits = self.logits(torch.cat([p.reshape(-1, p.shape[-1]) for p in picked]))
        chunks = logits.split([b * t for b, t in shapes])
        return [chunk.view(b, t, -1) for chunk, (b, t) in zip(chunks, shapes, strict=True)]  # [B, T', V]


def load_block(
    model_path: Path,
    layers: str | tuple[int, int] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_cache_tokens: int = 65536,
    idle_timeout_s: float = 300.0,
    prefix_cache_tokens: int = 0,
    cuda_graphs: bool | None = None,
    quant: str = "none",
) -> Block:
    """Build the block's modules empty and read only its tensors. `layers` None means all.
    `cuda_graphs`: capture decode steps as CUDA graphs (None: on a CUDA device). `quant`: none,
    int8 or int4 weights (inference/quant.py)."""
    config = load_config(model_path)
    total = config.num_hidden_layers
    if layers is None:
        span = Span(0, total, total)
    elif isinstance(layers, str):
        span = parse_span(layers, total)
    else:
        span = Span(layers[0], layers[1], total)
    saved = getattr(config, "dtype", None)  # the checkpoint's own dtype (a name or a torch.dtype)
    dev, dt = resolve_device(device, dtype, getattr(torch, saved, None) if isinstance(saved, str) else saved)
    checkpoint = open_checkpoint(Path(model_path))  # safetensors, a GGUF read in place, or Hub shards
    with _LOADING:  # init_empty_weights patches torch for the whole process while it runs
        block = Block(config, span, max_cache_tokens, idle_timeout_s, prefix_cache_tokens)
        block.load_weights(checkpoint, dev, dt, quant)
    block.eval().requires_grad_(False)
    if cuda_graphs is None:
        cuda_graphs = dev.type == "cuda"
    if cuda_graphs:
        block.enable_decode_graphs(GraphSettings.within(max_cache_tokens, config.max_position_embeddings))
    elif not block.latent and (shape := eager_pool_shape(max_cache_tokens, config.max_position_embeddings)):
        block.kv.enable_pool(config, block.dtype, block.device, *shape)  # decode rows attend together
    return block
