"""Hugging Face Hub repos as models: resolution fetches only the small files (config, tokenizer,
generation config, the safetensors index) into a model directory; a shard is downloaded when a
tensor in it is first read, so a peer fetches only the shards that hold its layers. Downloads go
through huggingface_hub's cache (HF_HUB_CACHE, HF_ENDPOINT, HF_HUB_OFFLINE apply)."""

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ModelNotFoundError, WeightFileError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
OPTIONAL_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}


def is_hub_id(name: str) -> bool:
    """ "org/name" that is not a local path: a Hugging Face Hub repo id."""
    return bool(_REPO_ID.fullmatch(name)) and not name.endswith(".gguf") and not Path(name).exists()


def hub_model_dir(repo: str, models_dir: Path) -> Path:
    """The model directory of `repo`'s current revision (offline: the cached one), made once."""
    config = _download(repo, "config.json", None)
    revision = config.parent.name  # .../snapshots/<commit>/config.json
    target = models_dir / "hub" / f"{repo.replace('/', '--')}-{revision[:12]}"
    if (target / "layerswarm.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        shutil.copyfile(config, tmp / "config.json")
        for name in OPTIONAL_FILES:
            found = _download(repo, name, revision, optional=True)
            if found is not None:
                shutil.copyfile(found, tmp / name)
        weights = _write_index(repo, revision, tmp)
        marker = {"hub": repo, "revision": revision, "weights": weights}
        (tmp / "layerswarm.json").write_text(json.dumps(marker))
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process made it meanwhile: theirs is as good
            if not (target / "layerswarm.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def shard_fetcher(repo: str, revision: str) -> Callable[[str], Path]:
    """file name -> local path of that file of the repo at `revision`, downloaded on first use."""

    def fetch(file: str) -> Path:
        return _download(repo, file, revision, error=WeightFileError)

    return fetch


def _write_index(repo: str, revision: str, out: Path) -> int:
    """Copy (or, for a single-file repo, write from the file's header) the safetensors index;
    returns how many weights the model has, without downloading any shard."""
    index = _download(repo, INDEX, revision, optional=True)
    if index is not None:
        shutil.copyfile(index, out / INDEX)
        metadata = json.loads(index.read_text()).get("metadata") or {}
        if "total_parameters" in metadata:
            return int(metadata["total_parameters"])
        if "total_size" not in metadata:
            raise WeightFileError(f"{INDEX} of {repo} has neither metadata.total_parameters nor total_size")
        config = json.loads((out / "config.json").read_text())
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        return int(metadata["total_size"]) // _ITEM_BYTES.get(dtype, 4)
    shapes = _single_file_shapes(repo, revision)
    weight_map = dict.fromkeys(shapes, SINGLE)
    total = sum(math.prod(shape) for shape in shapes.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_parameters": total}, "weight_map": weight_map}))
    return total


def _single_file_shapes(repo: str, revision: str) -> dict[str, list[int]]:
    """Tensor name -> shape of a repo's model.safetensors: from the cached file, else from its
    header alone (two ranged requests)."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from safetensors import safe_open

    cached = try_to_load_from_cache(repo, SINGLE, revision=revision)
    if isinstance(cached, str):
        with safe_open(cached, framework="pt") as f:
            return {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ModelNotFoundError(
            f"{repo} has no {INDEX} and its {SINGLE} is not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
        )
    try:
        header = HfApi().parse_safetensors_file_metadata(repo, SINGLE, revision=revision)
    except Exception as e:  # huggingface_hub raises HTTP, parsing and not-a-safetensors-repo errors
        raise ModelNotFoundError(f"{repo} has neither {INDEX} nor a readable {SINGLE}: {e}") from e
    return {name: info.shape for name, info in header.tensors.items()}


def _download(
    repo: str, file: str, revision: str | None, error: type = ModelNotFoundError, optional: bool = False
) -> Path | None:
    """The file of `repo` at `revision`, through the Hugging Face cache; with `optional`, None where
    the repo has no such file (a file that is neither cached nor reachable is an error either way)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    where = f"{repo}" + (f" at {revision[:12]}" if revision else "")
    try:
        return Path(hf_hub_download(repo, file, revision=revision))
    except LocalEntryNotFoundError:  # (a subclass of the next: "not cached, cannot ask", not "none")
        raise error(
            f"{file} of {where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and it cannot be "
            "downloaded (HF_HUB_OFFLINE is set or the Hub is unreachable)"
        ) from None
    except EntryNotFoundError as e:
        if optional:
            return None
        raise error(f"{repo} has no {file}: {e}") from e
    except (OSError, ValueError) as e:  # HTTP errors (no such repo, file, revision); names it refuses
        raise error(f"cannot download {file} of {where}: {type(e).__name__}: {e}") from e
