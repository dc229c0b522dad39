"""LayerSwarm's inference core: model resolution, blocks of layers with per-session KV caches,
sampling, tokenizer. Knows nothing of HTTP."""

# quant first: it quiets what importing torchao logs, and transformers imports torchao
from . import quant  # noqa: I001
from .block import Block, Span, load_block, parse_span, resolve_device
from .chain import LocalChain, decode_one_token, generate, prefill
from .errors import (
    CacheFullError,
    InferenceError,
    LayerRangeError,
    ModelNotFoundError,
    RequestTooLarge,
    SessionError,
    UnsupportedArchitectureError,
    WeightFileError,
)
from .models import DEFAULT_MODEL, ModelSource, resolve_model
from .quant import QUANT_MODES, quantize_block, weights_bytes
from .sampling import SamplingParams, sample
from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "Block",
    "CacheFullError",
    "InferenceError",
    "LayerRangeError",
    "LocalChain",
    "ModelNotFoundError",
    "ModelSource",
    "QUANT_MODES",
    "RequestTooLarge",
    "SamplingParams",
    "SessionError",
    "Span",
    "Tokenizer",
    "UnsupportedArchitectureError",
    "WeightFileError",
    "decode_one_token",
    "generate",
    "load_block",
    "parse_span",
    "prefill",
    "quant",
    "quantize_block",
    "resolve_device",
    "resolve_model",
    "sample",
    "weights_bytes",
]
