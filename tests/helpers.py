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
            if p.dim() == 2:
                p.normal_(0, 0.2)
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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
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
