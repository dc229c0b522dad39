"""Reading only the tensors a block needs: from (possibly sharded) safetensors, from a GGUF file
(inference/gguf_weights.py) or from a Hugging Face Hub repo's shards, each fetched when first read
(inference/hub.py). A model directory's layerswarm.json says which backs it."""

import json
import math
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open

from .errors import WeightFileError
from .gguf_weights import GgufCheckpoint
from .hub import shard_fetcher

MARKER = "layerswarm.json"  # written by resolve_model: where a cached model's weights live


class Checkpoint:
    """Tensor names -> files of a Hugging Face safetensors checkpoint; reads tensors one by one.
    `fetch` turns a shard's file name into a local path for shards not in `path` (a Hub download)."""

    def __init__(self, path: Path, fetch: Callable[[str], Path] | None = None):
        self.path, self.fetch = path, fetch
        self.names_read: list[str] = []  # every tensor read, in order (what a block really touched)
        index = path / "model.safetensors.index.json"
        try:
            if index.is_file():  # names -> shards without opening any shard
                self.files = dict(json.loads(index.read_text())["weight_map"])
            else:
                self.files = {}
                for file in sorted(path.glob("*.safetensors")):
                    with safe_open(file, framework="pt") as f:  # the header only
                        self.files.update(dict.fromkeys(f.keys(), file.name))
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise WeightFileError(f"cannot read the weight index of {path}: {e}") from e
        if not self.files:
            raise WeightFileError(f"{path} has no safetensors weights")
        for file in set(self.files.values()):  # an index names shards beside it, nothing else
            shard = PurePosixPath(file) if isinstance(file, str) else None
            if shard is None or shard.is_absolute() or ".." in shard.parts or not shard.parts:
                raise WeightFileError(f"the weight index of {path} names an unsafe shard path {file!r}")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def local_file(self, file: str) -> Path:
        """The shard's path here, fetched first where it is not (and a fetcher is given)."""
        local = self.path / file
        if local.is_file() or self.fetch is None:
            return local
        return self.fetch(file)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise WeightFileError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            local = self.local_file(file)
            try:
                with safe_open(local, framework="pt") as f:  # maps the shard; copies only these tensors
                    for name in file_names:
                        out[name] = f.get_tensor(name)
            except Exception as e:  # safetensors raises several types for truncated or corrupt files
                raise WeightFileError(f"cannot read {file}: {type(e).__name__}: {e}") from e
            self.names_read.extend(file_names)
        return out


def read_marker(path: Path) -> dict:
    """The model directory's layerswarm.json, or {} for a plain Hugging Face directory."""
    marker = path / MARKER
    if not marker.is_file():
        return {}
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise WeightFileError(f"cannot read {marker}: {e}") from e


def open_checkpoint(path: Path) -> Checkpoint | GgufCheckpoint:
    """The checkpoint behind a model directory that resolve_model returned (or any Hugging Face
    directory): its GGUF file, its Hub repo's shards, or its own safetensors files."""
    path = Path(path)
    marker = read_marker(path)
    if "tensors" in marker:
        return GgufCheckpoint(path, marker)
    if "hub" in marker:
        return Checkpoint(path, shard_fetcher(marker["hub"], marker["revision"]))
    return Checkpoint(path)


def checkpoint_weights(path: Path) -> int:
    """How many weights (tensor elements) the model in `path` holds: from safetensors headers, the
    GGUF table, or the Hub index (never reading or downloading tensor data)."""
    path = Path(path)
    marker = read_marker(path)
    if "tensors" in marker:
        return sum(math.prod(t["shape"]) for t in marker["tensors"].values())
    if "hub" in marker:
        return int(marker["weights"])
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise WeightFileError(f"cannot read the header of {file.name}: {e}") from e
    return total
