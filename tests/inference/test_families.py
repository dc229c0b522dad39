"""Every family a block hosts, on a tiny random model with the family's own features switched on
(tests/helpers.py FAMILY_CONFIGS): three blocks, batched over several sessions, give float32 logits
within 1e-4 of transformers' monolithic model at three splits (for DeepSeek-V3, GLM-4.5 and
Qwen3-MoE the first falls inside the leading dense layers)."""

import pytest
import torch

from inference.architectures import FAMILIES as HOSTED
from inference.batch import Step
from inference.block import load_block
from inference.cuda_graphs import GraphSettings, graph_problem
from inference.errors import UnsupportedArchitectureError
from tests.helpers import FAMILIES, monolithic

SPLITS = [("0:1", "1:3", "3:4"), ("0:2", "2:3", "3:4"), ("0:1", "1:2", "2:4")]
PROMPTS = [[5, 17, 33, 80, 9, 44, 12, 7, 100, 3, 60, 61], [9, 9, 1, 200, 31], list(range(3, 23))]
DECODE = 6  # decode steps after the prefill, past the sliding windows of 6


def test_every_hosted_family_is_tested():
    assert set(FAMILIES) == set(HOSTED)


def chain_logits(blocks, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Prefill every prompt, then decode DECODE steps of each (feeding the prompt's own next ids,
    teacher-forced), all sessions of a step in one batched forward per block."""
    steps = [(f"s{i}", torch.tensor([p[:-DECODE]]), 0) for i, p in enumerate(prompts)]
    outs: list[list[torch.Tensor]] = [[] for _ in prompts]
    for t in range(DECODE + 1):
        xs = [s[1] for s in steps]
        for block in blocks:
            results = block.forward_batch(
                [Step(sid, x, pos, last_only=False) for (sid, _, pos), x in zip(steps, xs, strict=True)]
            )
            assert not any(isinstance(r, Exception) for r in results), results
            xs = results
        for i, logits in enumerate(xs):
            outs[i].append(logits[0])
        if t < DECODE:
            steps = [
                (sid, torch.tensor([[p[len(p) - DECODE + t]]]), pos + x.shape[1])
                for (sid, x, pos), p in zip(steps, prompts, strict=True)
            ]
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("kind", FAMILIES)
def test_three_blocks_match_the_monolithic_model_at_three_splits(family_model, kind):
    path = family_model(kind)
    model = monolithic(path)
    prompts = [p + [40 + i, 41, 42, 43, 44, 45] for i, p in enumerate(PROMPTS)]
    with torch.no_grad():
        expected = [model(torch.tensor([p])).logits[0] for p in prompts]  # [T, V]: every position
    for split in SPLITS:
        blocks = [load_block(path, layers) for layers in split]
        got = chain_logits(blocks, prompts)
        for g, e in zip(got, expected, strict=True):
            assert torch.allclose(g, e, atol=1e-4, rtol=0), (kind, split, (g - e).abs().max())


def test_latent_decode_rows_of_one_length_attend_as_one_batch(family_model, monkeypatch):
    """DeepSeek-V3's decode rows of one length attend in one call over their expanded histories
    (inference/batch.py _latent_rows), exact against the monolithic model."""
    from inference import batch as batch_module

    path = family_model("deepseek_v3")
    model = monolithic(path)
    prompts = [[5 + i, 17, 33, 80, 9, 44, 12, 7, 100, 3, 60, 61] for i in range(3)]
    with torch.no_grad():
        expected = [model(torch.tensor([p])).logits[0] for p in prompts]
    batched, latent_rows = [], batch_module._latent_rows
    monkeypatch.setattr(
        batch_module, "_latent_rows", lambda *a: batched.append(latent_rows(*a)) or batched[-1]
    )
    got = chain_logits([load_block(path, layers) for layers in SPLITS[0]], prompts)
    assert sum(rows is not None for rows in batched) == DECODE * 4  # every decode step, every layer
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-4, rtol=0), (g - e).abs().max()


def test_a_family_that_cannot_be_served_exactly_is_refused_with_why(family_model, tmp_path):
    from transformers import AutoConfig

    from inference.architectures import get_family

    config = AutoConfig.for_model("gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(UnsupportedArchitectureError, match="use_bidirectional_attention"):
        get_family(config)
    config = AutoConfig.for_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedArchitectureError, match="dynamic"):
        get_family(config)
    config = AutoConfig.for_model("deepseek_v3", quantization_config={"quant_method": "fp8"})
    with pytest.raises(UnsupportedArchitectureError, match="quantized \\('fp8'\\)"):
        get_family(config)
    with pytest.raises(UnsupportedArchitectureError, match="gemma3_text"):
        get_family(AutoConfig.for_model("gemma3"))
    with pytest.raises(UnsupportedArchitectureError, match="not supported; supported: .*qwen3_moe"):
        get_family(AutoConfig.for_model("bert"))


STATIC = GraphSettings(batch_sizes=(1, 4), positions=64, slots=4, shortest=8)


@pytest.mark.parametrize("kind", FAMILIES)
def test_static_decode_steps_match_or_the_family_is_left_eager_with_why(family_model, kind):
    """The static decode step that CUDA graphs capture, run eagerly here: exact for the families
    it can hold; the others (mixtures of experts, sinks, latent attention) run every step eagerly,
    and graph_problem says why."""
    path = family_model(kind)
    blocks = [load_block(path, layers, max_cache_tokens=4096) for layers in SPLITS[0]]
    problems = [graph_problem(block) for block in blocks]
    if kind in ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "glm4_moe"):
        assert all(problems), problems
        assert not any(block.enable_decode_graphs(STATIC, capture=False) for block in blocks)
        return
    assert problems == [None] * 3
    assert all(block.enable_decode_graphs(STATIC, capture=False) for block in blocks)
    model = monolithic(path)
    prompts = [p + [40 + i, 41, 42, 43, 44, 45] for i, p in enumerate(PROMPTS)]
    with torch.no_grad():
        expected = [model(torch.tensor([p])).logits[0] for p in prompts]
    got = chain_logits(blocks, prompts)
    assert all(block.graphs.steps > 0 for block in blocks)  # the decode steps went the static way
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-4, rtol=0), (kind, (g - e).abs().max())


def test_what_the_family_keeps_in_float32_stays_float32_in_bfloat16(family_model):
    """DeepSeek-V3's router weights and correction bias (a buffer, loaded like a parameter) are
    held in float32 in a bfloat16 block, as transformers holds them; the rest is bfloat16."""
    path = family_model("deepseek_v3")
    block = load_block(path, "2:4", dtype="bfloat16")
    model = monolithic(path)
    gate, reference = block.layers[0].mlp.gate, model.model.layers[2].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, reference.e_score_correction_bias)
    assert gate.e_score_correction_bias.abs().sum() > 0
    assert block.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
