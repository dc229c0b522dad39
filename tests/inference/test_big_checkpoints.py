"""A ~2B-parameter checkpoint, sharded safetensors and GGUF: a block serving a quarter of the layers
holds about its share of the bytes while loading and reads no other layer's tensor."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from inference.gguf_weights import describe_gguf
from inference.weights import MARKER

pytestmark = pytest.mark.slow

LAYERS, SHARD_LAYERS, SPAN = 36, 4, (0, 9)  # a quarter: the embedding and 9 of 36 layers
CONFIG = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
LAYER_TENSORS = {  # HF name -> (GGUF name, shape), of layer {i}
    "self_attn.q_proj.weight": ("attn_q.weight", (2048, 2048)),
    "self_attn.k_proj.weight": ("attn_k.weight", (2048, 2048)),
    "self_attn.v_proj.weight": ("attn_v.weight", (2048, 2048)),
    "self_attn.o_proj.weight": ("attn_output.weight", (2048, 2048)),
    "mlp.gate_proj.weight": ("ffn_gate.weight", (5632, 2048)),
    "mlp.up_proj.weight": ("ffn_up.weight", (5632, 2048)),
    "mlp.down_proj.weight": ("ffn_down.weight", (2048, 5632)),
    "input_layernorm.weight": ("attn_norm.weight", (2048,)),
    "post_attention_layernorm.weight": ("ffn_norm.weight", (2048,)),
}
OTHERS = {
    "model.embed_tokens.weight": ("token_embd.weight", (32000, 2048)),
    "model.norm.weight": ("output_norm.weight", (2048,)),
    "lm_head.weight": ("output.weight", (32000, 2048)),
}


def all_tensors() -> dict[str, tuple[str, tuple[int, ...]]]:
    names = dict(OTHERS)
    for i in range(LAYERS):
        for rest, (gguf, shape) in LAYER_TENSORS.items():
            names[f"model.layers.{i}.{rest}"] = (f"blk.{i}.{gguf}", shape)
    return names


def fill(shape) -> torch.Tensor:
    return torch.full(shape, 0.01, dtype=torch.bfloat16)  # cheap: no RNG over 2B values


def write_safetensors(path) -> None:
    path.mkdir()
    LlamaConfig(**CONFIG, dtype="bfloat16").save_pretrained(path)
    tensors, weight_map = all_tensors(), {}
    shards = [list(OTHERS)] + [
        [n for n in tensors if n.startswith("model.layers.") and int(n.split(".")[2]) // SHARD_LAYERS == s]
        for s in range(LAYERS // SHARD_LAYERS)
    ]
    for s, names in enumerate(shards):
        file = f"model-{s:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: fill(tensors[n][1]) for n in names}, path / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def write_gguf(path) -> None:
    """The same weights as a BF16 GGUF with llama naming, written tensor by tensor, and the model
    directory resolve_model would make of it (config and tensor table)."""
    import gguf

    path.mkdir()
    file = path / "big.gguf"
    writer = gguf.GGUFWriter(file, "llama")
    writer.add_block_count(LAYERS)
    writer.add_head_count(CONFIG["num_attention_heads"])
    writer.add_head_count_kv(CONFIG["num_key_value_heads"])
    writer.add_embedding_length(CONFIG["hidden_size"])
    tensors = all_tensors()
    for gguf_name, shape in tensors.values():
        nbytes = int(np.prod(shape)) * 2
        writer.add_tensor_info(
            gguf_name, shape, np.dtype(np.uint16), nbytes, raw_dtype=gguf.GGMLQuantizationType.BF16
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, shape in tensors.values():
        writer.write_tensor_data(fill(shape).view(torch.uint16).numpy())
    writer.close()
    model_dir = path / "model"
    config = LlamaConfig(**CONFIG)
    config.save_pretrained(model_dir)
    (model_dir / MARKER).write_text(json.dumps(describe_gguf(file, config)))


PROBE = """
import json, torch
from inference.block import Block, load_config, parse_span
from inference.weights import open_checkpoint

def rss_mb(key):
    status = open("/proc/self/status").read()
    return int(status.split(key + ":")[1].split()[0]) / 1024

path = {path!r}
config = load_config(path)
before = rss_mb("VmRSS")
checkpoint = open_checkpoint(path)
block = Block(config, parse_span("{start}:{end}", config.num_hidden_layers), 1024, 60.0)
block.load_weights(checkpoint, torch.device("cpu"), torch.bfloat16)
with torch.no_grad():  # page in what the block holds (a weight may map its file): every 2 KiB
    sum(float(p.reshape(-1)[::1024].sum(dtype=torch.float32)) for p in block.parameters())
params = {{id(p): p.numel() * p.element_size() for p in block.parameters()}}
print(json.dumps({{"peak_mb": rss_mb("VmHWM") - before, "share_mb": sum(params.values()) / 2**20,
                  "names": checkpoint.names_read}}))
"""


def load_in_subprocess(path) -> dict:
    probe = textwrap.dedent(PROBE.format(path=str(path), start=SPAN[0], end=SPAN[1]))
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_a_quarter_of_a_2b_checkpoint_loads_in_its_share(tmp_path, kind):
    path = tmp_path / kind
    if kind == "safetensors":
        write_safetensors(path)
    else:
        write_gguf(path)
        path = path / "model"
    tensors = all_tensors()
    total_mb = sum(int(np.prod(shape)) * 2 for _, shape in tensors.values()) / 2**20
    assert 3700 < total_mb < 3900  # ~2.0B bf16 weights
    got = load_in_subprocess(path)
    expected = {"model.embed_tokens.weight"} | {
        n for n in tensors if n.startswith("model.layers.") and int(n.split(".")[2]) < SPAN[1]
    }
    assert sorted(got["names"]) == sorted(expected)  # each once, and nothing of another layer
    share_mb = sum(int(np.prod(tensors[n][1])) * 2 for n in expected) / 2**20
    assert abs(got["share_mb"] - share_mb) < 1
    print(
        f"{kind}: peak RSS growth {got['peak_mb']:.0f} MiB for a {share_mb:.0f} MiB share "
        f"({got['peak_mb'] / share_mb:.2f}x) of a {total_mb:.0f} MiB model"
    )
    assert got["peak_mb"] <= 1.3 * share_mb, (got["peak_mb"], share_mb)
