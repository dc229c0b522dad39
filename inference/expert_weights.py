"""Where a block parameter's tensor lies in a checkpoint. Most are one tensor of the same name; a
mixture of experts' fused expert weights are stored one tensor per expert in the checkpoints people
publish (Qwen3-MoE, DeepSeek-V3, GLM-4.5: `mlp.experts.E.gate_proj.weight`; Mixtral:
`block_sparse_moe.experts.E.w1.weight`), and transformers fuses them as it loads: so does a block,
reading only its own layers' experts."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

# a fused parameter's name -> the per-expert parts concatenated (dim 0) into each expert's slice
_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
MAX_EXPERTS = 4096


@dataclass(frozen=True)
class Read:
    """The checkpoint tensors one parameter is made of, and how."""

    names: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] = lambda tensors: tensors[0]


def locate(name: str, checkpoint) -> Read:
    """The tensors holding parameter `name` (its checkpoint name in transformers' layout)."""
    if name in checkpoint:
        return Read((name,))
    renamed = name.replace(".mlp.", ".block_sparse_moe.")  # Mixtral's name for its sparse block
    if renamed in checkpoint:
        return Read((renamed,))
    prefix, _, fused = name.rpartition(".")
    if prefix.endswith(".mlp.experts") and fused in _PARTS:
        return _experts(prefix, _PARTS[fused], checkpoint)
    return Read((name,))  # missing: the checkpoint's read names it


def _experts(prefix: str, parts: tuple[str, ...], checkpoint) -> Read:
    """Per-expert tensors `prefix.E.part.weight` (or Mixtral's), stacked into [E, ...]."""
    layouts = [(prefix, {p: p for p in parts}), (prefix.replace(".mlp.", ".block_sparse_moe."), _MIXTRAL)]
    for base, names in layouts:
        if f"{base}.0.{names[parts[0]]}.weight" not in checkpoint:
            continue
        experts = 0
        while experts < MAX_EXPERTS and f"{base}.{experts}.{names[parts[0]]}.weight" in checkpoint:
            experts += 1
        sources = tuple(f"{base}.{e}.{names[p]}.weight" for e in range(experts) for p in parts)
        n = len(parts)

        def combine(tensors: list[torch.Tensor], n: int = n) -> torch.Tensor:
            return torch.stack([torch.cat(tensors[i : i + n]) for i in range(0, len(tensors), n)])

        return Read(sources, combine)
    return Read((f"{prefix}.{'_'.join(parts)}",))
