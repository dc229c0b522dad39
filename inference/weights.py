"""Reading only the tensors a block needs from (possibly sharded) safetensors checkpoints."""

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import WeightFileError


class Checkpoint:
    """Tensor names -> files of a Hugging Face safetensors checkpoint; reads tensors one by one."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {name: path / file for name, file in weight_map.items()}
            else:
                self.files = {}
                for file in sorted(path.glob("*.safetensors")):
                    with safe_open(file, framework="pt") as f:
                        self.files.update(dict.fromkeys(f.keys(), file))
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise WeightFileError(f"cannot read the weight index of {path}: {e}") from e
        if not self.files:
            raise WeightFileError(f"{path} has no safetensors weights")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise WeightFileError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(file, framework="pt") as f:
                    for name in file_names:
                        out[name] = f.get_tensor(name)
            except Exception as e:  # safetensors raises several types for truncated or corrupt files
                raise WeightFileError(f"cannot read {file.name}: {type(e).__name__}: {e}") from e
        return out


def checkpoint_weights(path: Path) -> int:
    """How many weights (tensor elements) the safetensors files in `path` hold, from their headers."""
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise WeightFileError(f"cannot read the header of {file.name}: {e}") from e
    return total
