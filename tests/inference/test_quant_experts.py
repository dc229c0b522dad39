"""Quantized mixtures of experts (inference/quant.py): the families' 3-D expert weights held int8
or int4, their output against float32, and the bytes they hold."""

import pytest
import torch
from torch import nn
from transformers import DeepseekV3Config, Glm4MoeConfig, GptOssConfig, MixtralConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from inference import LocalChain, load_block, weights_bytes
from inference.quant import QuantizedExperts, bytes_per_weight, expert_weights, quantize_linears
from tests.helpers import save_tiny_model

MODES = ("int8", "int4")
HIDDEN, EXPERTS, TOP_K = 64, 8, 2
FAMILIES = {  # model_type -> (config, the family's mixture-of-experts module)
    "qwen3_moe": (
        lambda: Qwen3MoeConfig(
            hidden_size=HIDDEN, moe_intermediate_size=96, num_experts=EXPERTS, num_experts_per_tok=TOP_K
        ),
        Qwen3MoeSparseMoeBlock,
    ),
    "mixtral": (
        lambda: MixtralConfig(
            hidden_size=HIDDEN, intermediate_size=96, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K
        ),
        MixtralSparseMoeBlock,
    ),
    "gpt_oss": (  # transposed layout [E, H, 2I], interleaved gate/up, biases
        lambda: GptOssConfig(
            hidden_size=HIDDEN, intermediate_size=96, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K
        ),
        GptOssMLP,
    ),
    "deepseek_v3": (lambda: _grouped(DeepseekV3Config), DeepseekV3MoE),  # shared experts beside the routed
    "glm4_moe": (lambda: _grouped(Glm4MoeConfig), Glm4MoeMoE),
}


def _grouped(config_class):
    """A config of a family with grouped top-k routing and a shared expert (DeepSeek-V3, GLM-4.5)."""
    return config_class(
        hidden_size=HIDDEN,
        moe_intermediate_size=96,
        n_routed_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        n_group=1,
        topk_group=1,
        n_shared_experts=1,
    )


def _moe(family: str, implementation: str = "grouped_mm") -> nn.Module:
    """The family's mixture of experts with random float32 weights, its experts run as a model
    built by from_config runs them (grouped_mm on this torch)."""
    make_config, cls = FAMILIES[family]
    config = make_config()
    config._experts_implementation = implementation
    torch.manual_seed(0)
    moe = cls(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    return moe.eval()


def _experts(moe: nn.Module) -> nn.Module:
    return next(m for m in moe.modules() if expert_weights(m) or type(m).__name__.endswith("Experts"))


def _out(moe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = moe(x)
    return y[0] if isinstance(y, tuple) else y  # (GPT-OSS's gives its router scores too)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_experts_stay_close_to_float32(family, mode):
    moe = _moe(family)
    x = torch.randn(2, 12, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _out(moe, x)
        quantize_linears(moe, mode)
        out = _out(moe, x)
    experts = _experts(moe)
    assert all(isinstance(getattr(experts, name), QuantizedExperts) for name in ("gate_up_proj", "down_proj"))
    assert out.shape == ref.shape and out.dtype == torch.float32
    # about the grid's step over sqrt(12) per weight, through two or four matmuls (shared experts)
    limit = {"int8": 0.02, "int4": 0.25}[mode]
    assert _relative_error(out, ref) < limit, (family, mode, _relative_error(out, ref))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_experts_compute_what_their_dequantized_weights_do(family, mode):
    """The family's own forward runs on the quantized experts unchanged: its output is that of
    float experts holding the dequantized weights, run as the unquantized model runs them."""
    moe = _moe(family)
    x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(2))
    quantize_linears(_experts(moe), mode)
    experts = _experts(moe)
    twin = _moe(family)
    with torch.no_grad():
        twin.load_state_dict(moe.state_dict(), strict=False)  # router, biases, shared experts
        twin_experts = _experts(twin)
        for name in ("gate_up_proj", "down_proj"):
            quantized = getattr(experts, name)
            getattr(twin_experts, name).copy_(torch.stack([quantized[e] for e in range(EXPERTS)]))
        torch.testing.assert_close(_out(moe, x), _out(twin, x), rtol=1e-5, atol=1e-6)
    assert experts.config._experts_implementation == "eager"
    assert twin_experts.config._experts_implementation == "grouped_mm"  # the model's own stays


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_experts_hold_their_bytes_per_weight(family, mode):
    experts = _experts(_moe(family))
    weights = sum(getattr(experts, name).numel() for name in expert_weights(experts))
    biases = sum(p.nbytes for p in experts.parameters() if p.dim() < 3)
    float_bytes = weights_bytes(experts)
    assert float_bytes == weights * 4 + biases
    quantize_linears(experts, mode)
    assert weights_bytes(experts) == weights * bytes_per_weight(mode, torch.float32) + biases
    ratio = weights_bytes(experts) / float_bytes
    assert ratio <= {"int8": 0.33, "int4": 0.17}[mode], ratio


def test_batched_indexing_gives_each_experts_slice():
    weight = torch.randn(EXPERTS, 48, 64, generator=torch.Generator().manual_seed(3))
    quantized = QuantizedExperts(weight, 8)
    ids = torch.tensor([3, 0, 3, 7])
    picked = quantized[ids]  # as transformers' batched_mm indexes
    assert picked.shape == (4, 48, 64) and len(quantized) == EXPERTS
    torch.testing.assert_close(picked, torch.stack([quantized[int(e)] for e in ids]), rtol=0, atol=0)
    assert (picked - weight[ids]).abs().max() < 0.02


def test_int4_experts_with_odd_rows_are_refused():
    with pytest.raises(ValueError, match="odd"):
        QuantizedExperts(torch.randn(4, 8, 33), 4)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return save_tiny_model("qwen3_moe", tmp_path_factory.mktemp("moe") / "qwen3_moe")


@pytest.mark.parametrize("mode", MODES)
def test_loaded_moe_block_quantizes_its_experts_as_layers_arrive(tiny_moe, mode):
    """Through load_block (the peer's path): every expert weight is quantized, the block holds
    int8 <= 0.35x and int4 <= 0.2x its float32 bytes, and two peers compute what one does."""
    block = load_block(tiny_moe, quant=mode)
    assert not [n for n, p in block.named_parameters() if p.dim() == 3]
    assert any(isinstance(m, QuantizedExperts) for m in block.modules())
    ratio = weights_bytes(block) / weights_bytes(load_block(tiny_moe))
    assert ratio <= {"int8": 0.35, "int4": 0.2}[mode], ratio
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    whole = block.forward("s", ids, 0, last_only=False)
    chain = LocalChain([load_block(tiny_moe, span, quant=mode) for span in ("0:2", "2:4")])
    torch.testing.assert_close(chain.forward("s", ids, 0, last_only=False), whole, rtol=0, atol=1e-6)
