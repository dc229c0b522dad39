"""The decoder families a block can host. A block is cut from the family's own transformers model,
built on the meta device: its embedding (Gemma's is scaled), decoder layers (q/k norms, sinks,
multi-head latent attention, mixtures of experts with shared experts and leading dense layers all
live inside them), final norm and rotary embedding (Gemma 3's has one per layer type) are the
family's own classes. What lies between those parts in the family's model is listed here, so that
a family whose model does anything else is refused rather than served inexactly."""

from dataclasses import dataclass

from transformers import PretrainedConfig

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Family:
    model_type: str
    moe: bool = False  # its layers route tokens to experts (README "Models": the table)


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama"),
        Family("mistral"),
        Family("qwen2"),
        Family("qwen3"),
        Family("qwen3_moe", moe=True),
        Family("gemma3_text"),
        Family("phi3"),
        Family("mixtral", moe=True),
        Family("deepseek_v3", moe=True),  # (Kimi K2's architecture)
        Family("gpt_oss", moe=True),
        Family("glm4_moe", moe=True),
        Family("olmo2"),
        Family("smollm3"),
    )
}
SUPPORTED = tuple(sorted(FAMILIES))

# families transformers has that a block cannot serve exactly, and why
_REFUSED = {
    "gemma3": "a Gemma 3 vision-language checkpoint; serve its text model (model_type gemma3_text)",
    "gemma2": "its attention soft-caps scores inside the kernel with a window pattern of its own",
}


def get_family(config: PretrainedConfig) -> Family:
    """The family of `config`, or UnsupportedArchitectureError naming why not."""
    model_type = getattr(config, "model_type", None)
    if model_type in _REFUSED:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported: {_REFUSED[model_type]}"
        )
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}"
        )
    problem = _inexact(config)
    if problem:
        raise UnsupportedArchitectureError(f"this {model_type} model cannot be served exactly: {problem}")
    return FAMILIES[model_type]


def _inexact(config: PretrainedConfig) -> str | None:
    """Why a config of a supported family turns on something a block does not reproduce."""
    quantized = getattr(config, "quantization_config", None)
    if quantized:
        method = (
            quantized.get("quant_method", "?") if isinstance(quantized, dict) else type(quantized).__name__
        )
        return (
            f"its checkpoint is quantized ({method!r}); serve a bfloat16 conversion, or let --quant quantize"
        )
    if getattr(config, "use_bidirectional_attention", False):
        return "use_bidirectional_attention is set (its attention is not causal)"
    if getattr(config, "attn_logit_softcapping", None) is not None and config.model_type != "gemma3_text":
        return "attn_logit_softcapping is set"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kinds = {r.get("rope_type", r.get("type")) for r in (rope.values() if _nested(rope) else [rope])} - {None}
    if "dynamic" in kinds:
        return "its rotary embedding is 'dynamic' NTK scaling, which rescales with the longest sequence of a batch"
    return None


def _nested(rope: dict) -> bool:
    return bool(rope) and all(isinstance(v, dict) for v in rope.values())


def causal_lm_class(config: PretrainedConfig) -> type:
    """The family's ...ForCausalLM class (a block builds one on the meta device and keeps its parts);
    `config` is one get_family accepted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def family_parts(config: PretrainedConfig, start: int, end: int) -> dict:
    """The parts of the family's own model a block of layers [start, end) keeps, built on the meta
    device (the embedding and norm are used by the first and last blocks only)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = causal_lm_class(config)(config)
    base = getattr(model, model.base_model_prefix)
    return {
        "embed_tokens": base.embed_tokens,
        "layers": list(base.layers[start:end]),
        "norm": base.norm,
        "rotary": base.rotary_emb,
        "keep_fp32": (
            tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ()),
            tuple(getattr(model, "_keep_in_fp32_modules", None) or ()),
        ),
    }


def layer_type(config: PretrainedConfig, layer: int) -> str:
    """A layer's attention type ("full_attention" or "sliding_attention")."""
    layer_types = getattr(config, "layer_types", None)
    return layer_types[layer] if layer_types is not None else "full_attention"


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
