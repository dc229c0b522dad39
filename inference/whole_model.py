"""The whole model as one transformers module, read through open_checkpoint: the reference that
tests and benchmarks compare blocks with, for any directory resolve_model returns (a GGUF-backed
or Hub-backed one has no weights of its own for `from_pretrained` to find)."""

from pathlib import Path

import torch

from .errors import WeightFileError
from .weights import open_checkpoint


def load_whole_model(path: Path, dtype: torch.dtype = torch.float32, **config_kwargs) -> torch.nn.Module:
    """AutoModelForCausalLM of `path` in `dtype`, in eval mode; `config_kwargs` go to its config
    (e.g. attn_implementation="eager")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    checkpoint = open_checkpoint(Path(path))
    names = [name for name in model.state_dict() if name in checkpoint]
    state = {name: t.to(dtype) for name, t in checkpoint.read(names).items()}
    missing, _ = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [name for name in missing if not (tied and name == "lm_head.weight")]
    if missing:
        raise WeightFileError(f"the checkpoint in {path} lacks {missing[0]!r} ({len(missing)} missing)")
    if tied:
        model.tie_weights()
    return model.eval()
