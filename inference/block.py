"""A block: layers [start, end) of a decoder, holding only its own weights, run per session with
that session's KV cache. The first block embeds token ids; the last applies the final norm and
lm_head and returns logits."""

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .architectures import get_architecture, sliding_window
from .errors import LayerRangeError, ModelNotFoundError, SessionError
from .kv_cache import CacheStore
from .weights import Checkpoint

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


def resolve_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """CPU float32 by default; cuda defaults to bfloat16."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    if dtype is None:
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dev, DTYPES[dtype]


def load_config(path: Path) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot read the model config in {path}: {e}") from e
    get_architecture(config)  # unsupported architectures fail here, before any weight is read
    config._attn_implementation = "sdpa"
    return config


class Block(nn.Module):
    def __init__(self, config: PretrainedConfig, span: Span, max_cache_tokens: int, idle_timeout_s: float):
        super().__init__()
        arch = get_architecture(config)
        self.config, self.span = config, span
        with init_empty_weights():  # parameters on the meta device; real tensors come from the checkpoint
            if span.is_first:
                self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
            self.layers = nn.ModuleList(arch.decoder_layer(config, i) for i in range(span.start, span.end))
            if span.is_last:
                self.norm = arch.norm(config.hidden_size, eps=config.rms_norm_eps)
                self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = arch.rotary(config)  # a few buffers, computed here, not loaded
        self.windows = [sliding_window(config, i) for i in range(span.start, span.end)]
        self.sessions = CacheStore(max_cache_tokens, idle_timeout_s)
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.rotary.inv_freq.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def checkpoint_names(self, checkpoint: Checkpoint) -> dict[str, str]:
        """Block parameter name -> checkpoint tensor name, for this block's share only."""
        names = {}
        for name, _ in self.named_parameters():
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

    def load_weights(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        names = self.checkpoint_names(checkpoint)
        tensors = checkpoint.read(sorted(set(names.values())))
        state = {name: tensors[source].to(device=device, dtype=dtype) for name, source in names.items()}
        self.load_state_dict(state, strict=False, assign=True)
        if (
            self.span.is_first
            and self.span.is_last
            and names["lm_head.weight"] == "model.embed_tokens.weight"
        ):
            self.lm_head.weight = self.embed_tokens.weight  # one tensor, as in the whole model
        self.rotary.to(device)
        missing = [n for n, p in self.named_parameters() if p.is_meta]
        assert not missing, f"parameters left unloaded: {missing}"

    def open_sessions(self) -> int:
        return len(self.sessions)

    def close(self, session_id: str) -> bool:
        return self.sessions.close(session_id)

    @torch.inference_mode()
    def forward(
        self,
        session_id: str,
        inputs: torch.Tensor,
        position: int,
        last_only: bool = True,
        layers: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Run one step of a session: prefill (T > 1) or decode (T = 1).

        inputs: token ids [B, T] when the step starts at layer 0, hidden states [B, T, H] otherwise.
        position: index of the first of the T positions; must equal what the session has cached
        (0 opens the session). layers: the global layers [a, b) to run, a part of this block's
        span (all of it by default); fixed for the session's life. Returns hidden states
        [B, T, H], or float32 logits [B, T', V] when b is the model's last layer (T' = 1 if
        last_only).
        """
        start, end = layers or (self.span.start, self.span.end)
        if not self.span.start <= start < end <= self.span.end:
            raise ValueError(f"layers {start}:{end} are not inside this block's span {self.span}")
        expect_ids = start == 0
        if expect_ids != (inputs.dim() == 2):
            want = "token ids [B, T]" if expect_ids else "hidden states [B, T, H]"
            raise ValueError(f"layers {start}:{end} take {want}, got a tensor of shape {tuple(inputs.shape)}")
        batch, steps = inputs.shape[:2]
        if steps == 0:
            raise ValueError("a step needs at least one position")
        with self._lock:
            self.sessions.expire()
            if position == 0:
                session = self.sessions.open(session_id, batch)
                session.layers = (start, end)
            else:
                session = self.sessions.get(session_id)
                if (session.length, session.batch, session.layers) != (position, batch, (start, end)):
                    raise SessionError(
                        f"session {session_id!r} holds {session.length} positions of batch {session.batch} "
                        f"for layers {session.layers[0]}:{session.layers[1]}; the step starts at {position} "
                        f"with batch {batch} for layers {start}:{end}"
                    )
            try:
                self.sessions.reserve(session, steps)
            except Exception:
                if position == 0:
                    self.sessions.close(session_id)  # leave no empty session behind
                raise
            hidden = self._run(session, inputs.to(self.device), start, end)
            session.advance(steps)
        if end < self.span.total:
            return hidden
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(self.norm(hidden)).float()

    def _run(self, session, inputs: torch.Tensor, start: int, end: int) -> torch.Tensor:
        past, steps = session.length, inputs.shape[1]
        positions = torch.arange(past, past + steps, device=self.device).expand(inputs.shape[0], steps)
        hidden = self.embed_tokens(inputs) if start == 0 else inputs.to(self.dtype)  # [B, T, H]
        cos_sin = self.rotary(hidden, positions)
        local = slice(start - self.span.start, end - self.span.start)
        windows = self.windows[local]
        masks = {w: self._mask(past, steps, w) for w in set(windows)}
        for layer, window in zip(self.layers[local], windows, strict=True):
            hidden = layer(
                hidden,
                attention_mask=masks[window],
                position_ids=positions,
                cache=session,
                use_cache=True,
                position_embeddings=cos_sin,
            )
        return hidden

    def _mask(self, past: int, steps: int, window: int | None) -> torch.Tensor | None:
        """Boolean mask [1, 1, T, past + T] (True = attend), or None where plain causal is exact."""
        if window is None and (steps == 1 or past == 0):
            return None  # decode attends to all; a fresh prefill is SDPA's own causal case
        query = torch.arange(past, past + steps, device=self.device)[:, None]
        key = torch.arange(past + steps, device=self.device)[None, :]
        allowed = key <= query
        if window is not None:
            allowed &= query - key < window
        return allowed[None, None]


def load_block(
    model_path: Path,
    layers: str | tuple[int, int] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_cache_tokens: int = 65536,
    idle_timeout_s: float = 300.0,
) -> Block:
    """Build the block's modules empty and read only its tensors. `layers` None means all."""
    config = load_config(model_path)
    total = config.num_hidden_layers
    if layers is None:
        span = Span(0, total, total)
    elif isinstance(layers, str):
        span = parse_span(layers, total)
    else:
        span = Span(layers[0], layers[1], total)
    dev, dt = resolve_device(device, dtype)
    checkpoint = Checkpoint(Path(model_path))
    block = Block(config, span, max_cache_tokens, idle_timeout_s)
    block.load_weights(checkpoint, dev, dt)
    return block.eval().requires_grad_(False)
