"""The decoder families a block can host: transformers' own layer, norm and rotary classes."""

from dataclasses import dataclass

from transformers import PretrainedConfig

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    decoder_layer: type
    norm: type
    rotary: type


def _llama() -> Architecture:
    from transformers.models.llama import modeling_llama as m

    return Architecture("llama", m.LlamaDecoderLayer, m.LlamaRMSNorm, m.LlamaRotaryEmbedding)


def _mistral() -> Architecture:
    from transformers.models.mistral import modeling_mistral as m

    return Architecture("mistral", m.MistralDecoderLayer, m.MistralRMSNorm, m.MistralRotaryEmbedding)


def _qwen2() -> Architecture:
    from transformers.models.qwen2 import modeling_qwen2 as m

    return Architecture("qwen2", m.Qwen2DecoderLayer, m.Qwen2RMSNorm, m.Qwen2RotaryEmbedding)


_ARCHITECTURES = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2}
SUPPORTED = tuple(sorted(_ARCHITECTURES))


def get_architecture(config: PretrainedConfig) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}"
        )
    return _ARCHITECTURES[model_type]()


def sliding_window(config: PretrainedConfig, layer: int) -> int | None:
    """The attention window of one layer, or None for full causal attention."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer] == "sliding_attention" else None
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return window
