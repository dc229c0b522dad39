"""Loading a block reads only its share; bad input fails with one clear error."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config

from inference import (
    LayerRangeError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    WeightFileError,
    load_block,
    resolve_model,
)
from inference.weights import Checkpoint
from tests.helpers import save_tiny_model


def unique_bytes(module) -> int:
    seen = {id(p): p for p in module.parameters()}
    return sum(p.numel() * p.element_size() for p in seen.values())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # untied and tied embeddings
def test_block_parameter_bytes_equal_its_share(tiny_models, kind):
    path = tiny_models[kind]
    ckpt = Checkpoint(path)
    tensors = ckpt.read(list(ckpt.files))
    size = {name: t.numel() * 4 for name, t in tensors.items()}

    def layer(i):
        return sum(v for k, v in size.items() if k.startswith(f"model.layers.{i}."))

    head = size.get("lm_head.weight", size["model.embed_tokens.weight"])

    assert unique_bytes(load_block(path, "1:3")) == layer(1) + layer(2)
    assert unique_bytes(load_block(path, "0:1")) == size["model.embed_tokens.weight"] + layer(0)
    assert unique_bytes(load_block(path, "3:4")) == layer(3) + size["model.norm.weight"] + head
    assert unique_bytes(load_block(path, "0:4")) == sum(size.values())  # tied: one tensor, once


def test_loading_the_middle_third_does_not_allocate_the_whole_model(tmp_path):
    # ~300 MB of float32 weights in 12 layers; the middle third is ~100 MB.
    path = save_tiny_model(
        "llama",
        tmp_path / "big",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    model_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    # VmHWM is the peak RSS of this process image (unlike ru_maxrss, it does not carry over from
    # the forking parent). Touching every parameter pages in whatever the block really holds.
    probe = textwrap.dedent(f"""
        import json
        import torch
        from inference import load_block

        def peak_mb():
            status = open("/proc/self/status").read()
            return int(status.split("VmHWM:")[1].split()[0]) / 1024

        before = peak_mb()
        block = load_block({str(path)!r}, "4:8")
        with torch.no_grad():
            sum(float(p.sum()) for p in block.parameters())
        params = sum(p.numel() * p.element_size() for p in block.parameters())
        print(json.dumps({{"peak_mb": peak_mb() - before, "params_mb": params / 2**20}}))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert model_mb > 250
    assert abs(got["params_mb"] - model_mb / 3) < 0.05 * model_mb
    # The block's third, plus page-ins around it; never the whole model.
    assert model_mb / 3 * 0.9 < got["peak_mb"] < 0.6 * model_mb, (got, model_mb)


@pytest.mark.parametrize("span", ["4:6", "2:2", "3:1", "-1:2", "a:b", "5"])
def test_bad_layer_range(tiny_llama, span):
    with pytest.raises(LayerRangeError):
        load_block(tiny_llama, span)


def test_missing_and_corrupt_weight_files(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # truncated
    with pytest.raises(WeightFileError):
        load_block(broken, "0:2")
    weights.unlink()
    with pytest.raises(WeightFileError, match="no \\*.safetensors"):
        resolve_model(str(broken))
    save_file({"model.embed_tokens.weight": torch.zeros(256, 64)}, weights)  # a tensor short
    with pytest.raises(WeightFileError, match="model.layers.0"):
        load_block(broken, "0:2")


def test_unknown_model_and_unsupported_architecture(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(
        UnsupportedArchitectureError,
        match="'gpt2' is not supported; supported: deepseek_v3, .*, llama, .*, qwen3_moe",
    ):
        load_block(tmp_path, "0:1")


def _llama_cpp_permute(w, n_head: int):
    """What llama.cpp's converter does to q/k rows (transformers' loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(file, arch: str, config, names: dict, original: dict):
    """`original` (HF names) as an F32 GGUF of `arch` under the GGUF `names`, q/k permuted."""
    import gguf

    writer = gguf.GGUFWriter(file, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    for hf, g in names.items():
        w = original[hf].numpy()
        if ".q_proj." in hf:
            w = _llama_cpp_permute(w, config.num_attention_heads)
        elif ".k_proj." in hf:
            w = _llama_cpp_permute(w, config.num_key_value_heads)
        writer.add_tensor(g, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


def test_a_gguf_backed_directory_reads_the_original_tensors(tiny_llama, tmp_path):
    """A tiny llama written as an F32 GGUF the way llama.cpp writes it (q/k permuted) reads back
    as the original tensors by their Hugging Face names; another architecture is refused by name."""
    from transformers import AutoConfig

    from inference.gguf_weights import describe_gguf
    from inference.weights import MARKER, checkpoint_weights, open_checkpoint

    config = AutoConfig.from_pretrained(tiny_llama)
    original = Checkpoint(tiny_llama).read(list(Checkpoint(tiny_llama).files))
    parts = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(config.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in parts.items()})
    file = _write_gguf(tmp_path / "tiny.gguf", "llama", config, names, original)
    model_dir = tmp_path / "model"
    config.save_pretrained(model_dir)
    (model_dir / MARKER).write_text(json.dumps(describe_gguf(file, config)))

    checkpoint = open_checkpoint(model_dir)
    got = checkpoint.read(sorted(names))
    assert all(torch.equal(got[n], original[n]) for n in names)
    assert checkpoint_weights(model_dir) == checkpoint_weights(tiny_llama)
    assert isinstance(open_checkpoint(tiny_llama), Checkpoint)  # a plain (or converted) directory

    embed = {"model.embed_tokens.weight": "token_embd.weight"}
    other = _write_gguf(tmp_path / "other.gguf", "gpt2", config, embed, original)
    with pytest.raises(
        UnsupportedArchitectureError, match="GGUF architecture 'gpt2'.*supported: llama, qwen2, qwen3"
    ):
        describe_gguf(other, config)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # untied and tied embeddings
def test_load_whole_model_equals_from_pretrained(tiny_models, kind):
    from transformers import AutoModelForCausalLM

    from inference.whole_model import load_whole_model

    path = tiny_models[kind]
    whole = load_whole_model(path, torch.float32, attn_implementation="eager")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(whole(tokens).logits, reference.eval()(tokens).logits)


@pytest.mark.parametrize(
    "shard", ["/etc/secret.safetensors", "../other/model.safetensors", "a/../../b.safetensors"]
)
def test_an_index_naming_a_shard_outside_its_directory_is_refused(tmp_path, shard):
    """A hostile index (a Hub repo's, say) cannot make a peer read weights from elsewhere."""
    import json

    from inference.errors import WeightFileError
    from inference.weights import Checkpoint

    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightFileError, match="unsafe shard path"):
        Checkpoint(tmp_path)


def test_a_hub_file_that_is_neither_cached_nor_reachable_is_an_error_not_absent():
    """Offline, a tokenizer file missing from the cache is not taken for one the repo lacks (a
    model directory without its tokenizer would be kept for good)."""
    from inference.errors import ModelNotFoundError
    from inference.hub import _download

    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        _download("nobody-here/no-such-model", "tokenizer.json", "main", optional=True)
