"""A random-weight Llama of a real shape, built on the device with a byte tokenizer and saved as
safetensors (no weights travel); each peer's share of it; HF `generate` on it, timed."""

import math
import time
from pathlib import Path

SHAPES = {
    "8b": dict(  # Llama-3-8B
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=1024,
    ),
}


def byte_tokenizer(vocab_size: int):
    """A tokenizer of one token per character (printable ASCII, then fillers), no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[chr(32 + i) if i < 95 else f"<x{i}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_model(shape: str, device, dtype, path: Path):
    """A random Llama of `shape`, initialised on the device, saved to `path` with a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    model.save_pretrained(path, max_shard_size="5GB")
    byte_tokenizer(config.vocab_size).save_pretrained(path)
    return model


def spans(layers: int, peers: int) -> list[tuple[int, int]]:
    cuts = [round(i * layers / peers) for i in range(peers + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def share_bytes(path: Path, start: int, end: int, total: int) -> int:
    """Bytes of the checkpoint's tensors that layers [start, end) load (as saved)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    every = set()  # the names of all shards (embed_tokens and lm_head may sit in different ones)
    for file in files:
        with safe_open(file, framework="pt") as f:
            every.update(f.keys())
    size = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name.startswith("model.layers."):
                    mine = start <= int(name.split(".")[2]) < end
                elif name.startswith("model.embed_tokens."):
                    mine = start == 0 or (end == total and "lm_head.weight" not in every)
                else:  # model.norm, lm_head
                    mine = end == total
                if mine:
                    t = f.get_slice(name)
                    size += math.prod(t.get_shape()) * _dtype_bytes(t.get_dtype())
    return size


def _dtype_bytes(name: str) -> int:
    return {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}.get(name, 4)


def hf_generate(model, prompts: list[list[int]], new_tokens: int, device) -> dict:
    import torch

    ids = torch.tensor(prompts, device=device)

    def timed(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,  # EOS ignored, as the swarm's side does
            do_sample=False,
            pad_token_id=0,
        )
        _sync(device)
        assert out.shape == (len(prompts), ids.shape[1] + n), f"generate gave {tuple(out.shape)}"
        return time.perf_counter() - t0

    first, whole = timed(1), timed(new_tokens)
    return {
        "batch": len(prompts),
        "tokens": len(prompts) * new_tokens,
        "wall_s": whole,
        "ttft_ms": 1000 * first,
        "ms_per_token": 1000 * (whole - first) / max(1, new_tokens - 1),
        "tok_s": len(prompts) * new_tokens / whole,
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
