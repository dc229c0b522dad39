"""`peer plan` (peers/swarm/plan.py): sizes and device lists as people write them, each layer's
bytes from a config alone (dense and mixture of experts), the greedy in-order split, and the
verdict: covered, or which layers are left and what one more device would need."""

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig, Qwen2Config, Qwen3MoeConfig

from inference.errors import UnsupportedArchitectureError
from peers.swarm.plan import (
    format_plan,
    make_plan,
    model_bytes,
    parse_devices,
    parse_size,
    plan_json,
    read_config,
)

H, INTER, KV_H, LAYERS, VOCAB = 64, 128, 32, 4, 256  # KV_H: the key/value heads' width
E, I_MOE = 8, 48


def _dense(tmp_path: Path, **kw) -> Path:
    path = tmp_path / "dense"
    LlamaConfig(
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        **kw,
    ).save_pretrained(path)
    return path  # config.json only: no weights


def _moe(tmp_path: Path) -> Path:
    path = tmp_path / "moe"
    Qwen3MoeConfig(
        hidden_size=H,
        intermediate_size=INTER,
        moe_intermediate_size=I_MOE,
        num_experts=E,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        head_dim=16,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    ).save_pretrained(path)
    return path


DENSE_WEIGHTS = 2 * H * H + 2 * H * KV_H + 3 * H * INTER  # q, o, k, v, gate, up, down
DENSE_LAYER = DENSE_WEIGHTS * 2 + 2 * H * 2  # bfloat16, with its two norms


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("24GB", 24 * 10**9),
        ("24GiB", 24 * 2**30),
        ("16000MB", 16 * 10**9),
        ("1.5gb", 15 * 10**8),
        (" 512 MiB ", 512 * 2**20),
        ("300B", 300),
    ],
)
def test_sizes_take_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["24", "24XB", "", "GB", "-1GB", "0GB", "24 G B"])
def test_sizes_without_a_known_unit_are_refused(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_a_bad_device_entry_is_named():
    assert parse_devices("24GB,24GiB,16GB") == [24 * 10**9, 24 * 2**30, 16 * 10**9]
    with pytest.raises(ValueError, match=r"--gpus entry 2 of 3: '16XB'"):
        parse_devices("24GB,16XB,8GB")
    with pytest.raises(ValueError, match=r"--gpus entry 2 of 2: ''"):
        parse_devices("24GB,")


def test_dense_layers_count_their_weights_in_the_dtype_and_quantized(tmp_path):
    name, config = read_config(str(_dense(tmp_path)))
    assert name == "dense"
    parts = model_bytes(name, config)
    assert parts.layers == (DENSE_LAYER,) * LAYERS
    assert parts.first == VOCAB * H * 2  # the embedding
    assert parts.last == VOCAB * H * 2 + H * 2  # lm_head and the final norm
    assert parts.shared == 0 and parts.total == LAYERS * DENSE_LAYER + parts.first + parts.last
    int8 = model_bytes(name, config, "int8")
    assert int8.layers[0] == DENSE_WEIGHTS * 1.25 + 2 * H * 2  # 1 byte + a float32 scale and offset per 32
    assert model_bytes(name, config, "int4").layers[0] == DENSE_WEIGHTS * 0.625 + 2 * H * 2
    assert model_bytes(name, config, dtype="float32").layers[0] == 2 * DENSE_LAYER
    with pytest.raises(ValueError, match="int3"):
        model_bytes(name, config, "int3")
    with pytest.raises(ValueError, match="float64"):
        model_bytes(name, config, dtype="float64")


def test_moe_layers_count_every_expert(tmp_path):
    name, config = read_config(str(_moe(tmp_path) / "config.json"))  # a bare config.json file
    parts = model_bytes(name, config)
    attention = 2 * H * H + 2 * H * KV_H + 2 * 16 + 2 * H  # q/k norms of head_dim 16, two layer norms
    dense = attention * 2 + 3 * H * INTER * 2  # layer 0: mlp_only_layers
    moe = attention * 2 + (E * 3 * H * I_MOE + E * H) * 2  # every expert, and the router
    assert parts.layers == (dense, moe, moe, moe)


def test_tied_embeddings_are_held_once_by_a_device_holding_both_ends(tmp_path):
    path = tmp_path / "tied"
    Qwen2Config(
        hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True,
    ).save_pretrained(path)  # fmt: skip
    parts = model_bytes(*read_config(str(path)))
    assert parts.shared == VOCAB * H * 2
    whole = make_plan(str(path), f"{parts.total}B", reserve_gb=0)
    assert whole.covered and whole.devices[0].used_bytes == parts.total
    assert model_bytes(*read_config(str(path)), "int4").shared == 0  # its lm_head is torchao's


def test_layers_split_greedily_in_order_and_cover(tmp_path):
    path = _dense(tmp_path)
    first, last = VOCAB * H * 2, VOCAB * H * 2 + H * 2
    gpus = f"{first + 2 * DENSE_LAYER}B,{DENSE_LAYER}B,100B,{DENSE_LAYER + last}B"
    plan = make_plan(str(path), gpus, reserve_gb=0)
    assert [(d.start, d.end) for d in plan.devices] == [(0, 2), (2, 3), (3, 3), (3, 4)]
    assert [d.used_bytes for d in plan.devices] == [
        first + 2 * DENSE_LAYER,
        DENSE_LAYER,
        0,
        DENSE_LAYER + last,
    ]
    assert plan.covered and plan.left_bytes == 0
    text = format_plan(plan)
    assert text.splitlines()[-1] == "covered: layers 0:4 fit on 3 devices"
    (gpu2,) = [line.split() for line in text.splitlines() if line.startswith("gpu2")]
    assert gpu2[3] == "-"  # gpu2, 0.10, kB, then its layers


def test_uncovered_layers_are_named_with_the_memory_that_covers_them(tmp_path):
    path = _moe(tmp_path)
    parts = model_bytes(*read_config(str(path)))
    gpus = f"{int((parts.first + parts.layers[0] + parts.layers[1]) / 0.9) + 10}B"
    plan = make_plan(str(path), gpus)  # the default reserve: 10%
    assert (plan.devices[0].start, plan.devices[0].end) == (0, 2)
    assert not plan.covered and plan.left_start == 2
    assert plan.left_bytes == parts.layers[2] + parts.layers[3] + parts.last
    assert "not covered: layers 2:4 are left" in format_plan(plan).splitlines()[-1]
    more = make_plan(str(path), f"{gpus},{plan.left_memory_bytes}B")
    assert more.covered and (more.devices[1].start, more.devices[1].end) == (2, 4)
    less = make_plan(str(path), f"{gpus},{plan.left_memory_bytes - 2}B")
    assert not less.covered


def test_the_reserve_is_kept_from_each_device(tmp_path):
    path = _dense(tmp_path)
    plan = make_plan(str(path), "1MB,2MB", reserve_gb=0.0005)
    assert [d.capacity_bytes for d in plan.devices] == [500_000, 1_500_000]
    assert plan.reserve == "0.0005 GB of each device"
    assert make_plan(str(path), "1MB").devices[0].capacity_bytes == 900_000
    with pytest.raises(ValueError, match="--reserve-gb"):
        make_plan(str(path), "1MB", reserve_gb=-1)


def test_json_holds_the_plan(tmp_path):
    plan = make_plan(str(_dense(tmp_path)), "1MB", quant="int8")
    data = json.loads(plan_json(plan))
    assert data["covered"] is True and data["num_layers"] == LAYERS and data["quant"] == "int8"
    assert data["devices"][0]["start"] == 0 and data["devices"][0]["end"] == LAYERS
    assert data["devices"][0]["memory_bytes"] == 10**6


def test_unsupported_families_and_missing_configs_are_refused(tmp_path):
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        make_plan(str(path), "1GB")
    with pytest.raises(Exception, match="unknown model"):
        make_plan(str(tmp_path / "nothing"), "1GB")
