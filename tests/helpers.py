"""Builders for tiny random models used across the tests."""

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**TINY, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**TINY, "tie_word_embeddings": True, **kw}),
    # a short sliding window, so that generation runs past it
    "mistral": lambda **kw: MistralConfig(**{**TINY, "sliding_window": 6, **kw}),
}
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
ALTERNATING = ["sliding_attention", "full_attention"] * 2  # with a short window: generation runs past it
# each family's own features switched on: q/k norms, scaled embeddings, soft-capping, per-type rotary,
# sliding/global patterns, sinks, latent attention, shared experts and leading dense layers
FAMILY_CONFIGS = {
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=16, num_experts=4, mlp_only_layers=[0, 1], norm_topk_prob=True, **MOE),
    "gemma3_text": dict(
        head_dim=16,
        sliding_window=6,
        layer_types=ALTERNATING,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=16,
        tie_word_embeddings=True,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    ),
    "phi3": dict(sliding_window=None),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=2,
        n_group=2,
        topk_group=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10_000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        rope_interleave=True,
        **MOE,
    ),
    "gpt_oss": dict(
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6, layer_types=ALTERNATING
    ),
    "glm4_moe": dict(
        head_dim=16,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=2,
        n_group=1,
        topk_group=1,
        use_qk_norm=True,
        partial_rotary_factor=0.5,
        **MOE,
    ),
    "olmo2": dict(),
    "smollm3": dict(no_rope_layers=[1, 1, 0, 1], sliding_window=None),
}


def _family_config(model_type: str):
    from transformers import AutoConfig

    def make(**kw):
        return AutoConfig.for_model(model_type, **{**TINY, **FAMILY_CONFIGS[model_type], **kw})

    return make


CONFIGS.update({name: _family_config(name) for name in FAMILY_CONFIGS})
FAMILIES = ("llama", "mistral", "qwen2", *FAMILY_CONFIGS)  # every family a block hosts


class FakeClock:
    """A clock for code that takes one: call it for the time, move it by setting `now`."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


def save_tiny_model(kind: str, path: Path, seed: int = 0, **overrides) -> Path:
    """A random model of family `kind` with a byte-level tokenizer, saved to `path`."""
    torch.manual_seed(seed)
    config = CONFIGS[kind](**overrides)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init is small; widen it so tokens are not all the same
        for p in model.parameters():
            if p.dim() >= 2:  # (mixtures of experts hold theirs as [experts, out, in])
                p.normal_(0, 0.2)
        for name, buffer in model.named_buffers():  # e.g. a router's correction bias (zeros at init)
            if name in model.state_dict() and buffer.is_floating_point():
                buffer.normal_(0, 1.0)
    model.save_pretrained(path)
    _byte_tokenizer(config.vocab_size).save_pretrained(path)
    return path


def _byte_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(vocab_size - len(specials)):  # printable ASCII, then fillers
        vocab[chr(32 + i) if i < 95 else f"<extra_{i}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    return fast


def monolithic(path: Path):
    """transformers' whole model of `path` in float32: from_pretrained where the directory holds
    safetensors files, else read through the checkpoint behind it (a GGUF read in place)."""
    from inference.whole_model import load_whole_model

    if not any(Path(path).glob("*.safetensors")):
        return load_whole_model(Path(path), torch.float32, attn_implementation="sdpa")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    except ValueError:  # a family transformers runs only eagerly (GPT-OSS: attention sinks)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def greedy_reference(model, prompt_ids: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """transformers' own greedy generate: up to the first `eos` (excluded), else exactly
    max_new_tokens."""
    model.generation_config.eos_token_id = eos
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    new = out[0, len(prompt_ids) :].tolist()
    return new[: new.index(eos)] if eos in new else new
