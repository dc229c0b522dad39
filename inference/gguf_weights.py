"""Reading a block's tensors straight from a GGUF file under their Hugging Face names.

`describe_gguf` parses the file once (at resolution) into a table: Hugging Face name -> GGUF tensor,
type, shape and byte range, plus what transformers' tensor transforms need. `GgufCheckpoint` then
reads and dequantizes only the asked tensors with plain file reads (no memory map, so nothing but
the returned tensors stays resident) and applies the transforms transformers' GGUF loader applies
(e.g. the reverse q/k permutation of llama-family attention), so the values equal its own loading.
"""

import os
from pathlib import Path

import numpy as np
import torch

from .errors import UnsupportedArchitectureError, WeightFileError

# GGUF `general.architecture` values whose tensor names and transforms transformers maps
# (its GGUF loader fails for llama-arch files named "mistral": no gguf-py tensor map for them)
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_PLAIN_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16: raw bits, viewed later


def describe_gguf(gguf: Path, config) -> dict:
    """The table `GgufCheckpoint` reads by: parsed once from the file's header, never its data.
    `config` is the Hugging Face config transformers reads from the same file."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    reader = GGUFReader(gguf)
    architecture = _field(reader, "general.architecture")
    check_gguf_architecture(architecture, config.model_type, gguf)
    processor_config = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": _heads_kv(reader, architecture),
    }
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    gguf_to_hf = get_gguf_hf_weights_map(_meta_model(config), processor_class(config=processor_config))
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name not in gguf_to_hf:
            continue  # e.g. rope_freqs: transformers computes these, it does not load them
        tensors[gguf_to_hf[tensor.name]] = {
            "gguf": tensor.name,
            "type": tensor.tensor_type.name,
            "shape": [int(d) for d in reversed(tensor.shape.tolist())],  # numpy order
            "offset": int(tensor.data_offset),
            "bytes": int(tensor.n_bytes),
        }
    return {
        "gguf": str(gguf.resolve()),
        "gguf_bytes": gguf.stat().st_size,
        "architecture": architecture,
        "processor_config": processor_config,
        "tensors": tensors,
    }


def check_gguf_architecture(architecture: str, model_type: str, gguf: Path) -> None:
    if architecture not in GGUF_ARCHITECTURES or model_type not in GGUF_ARCHITECTURES:
        shown = (
            repr(architecture)
            if model_type == architecture
            else f"{architecture!r} (model type {model_type!r})"
        )
        raise UnsupportedArchitectureError(
            f"GGUF architecture {shown} of {gguf.name} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def _heads_kv(reader, architecture: str) -> int | None:
    """As transformers reads it: None when the file does not say (then it leaves k unpermuted)."""
    value = _field(reader, f"{architecture}.attention.head_count_kv")
    return None if value is None else int(value)


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


class GgufCheckpoint:
    """Hugging Face tensor names -> tensors of one GGUF file, read and dequantized on demand."""

    def __init__(self, path: Path, table: dict):
        self.path = path
        self.gguf = Path(table["gguf"])
        self.tensors: dict[str, dict] = table["tensors"]
        self.architecture: str = table["architecture"]
        self.processor_config: dict = table["processor_config"]
        try:
            size = self.gguf.stat().st_size
        except OSError as e:
            raise WeightFileError(
                f"the GGUF file {self.gguf} that {path} reads from is gone ({e}); remove {path} to describe "
                "the model again"
            ) from e
        if size != table["gguf_bytes"]:
            raise WeightFileError(
                f"{self.gguf} changed since {path} described it ({size} bytes, was {table['gguf_bytes']}); "
                f"remove {path} to describe it again"
            )
        self.names_read: list[str] = []  # every tensor read, in order (what a block really touched)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def files(self) -> dict[str, Path]:
        return dict.fromkeys(self.tensors, self.gguf)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        missing = [name for name in names if name not in self.tensors]
        if missing:
            raise WeightFileError(f"tensor {missing[0]!r} is missing from the GGUF file {self.gguf}")
        processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self.processor_config)
        out = {}
        try:
            with open(self.gguf, "rb") as f:
                for name in names:
                    out[name] = self._read_one(f.fileno(), self.tensors[name], processor)
                    self.names_read.append(name)
        except OSError as e:
            raise WeightFileError(f"cannot read {self.gguf.name}: {e}") from e
        return out

    def _read_one(self, fd: int, info: dict, processor) -> torch.Tensor:
        from gguf import GGMLQuantizationType, dequantize, quant_shape_to_byte_shape

        raw = self._pread(fd, info)
        qtype, shape = GGMLQuantizationType[info["type"]], tuple(info["shape"])
        if info["type"] in _PLAIN_TYPES:  # kept in their own type: exact, and no float32 copy
            weights = np.frombuffer(raw, dtype=_PLAIN_TYPES[info["type"]]).reshape(shape)
        else:
            data = np.frombuffer(raw, dtype=np.uint8).reshape(quant_shape_to_byte_shape(shape, qtype))
            weights = dequantize(data, qtype)  # float32, as transformers has it
        weights = processor.process(weights=weights, name=info["gguf"]).weights
        tensor = torch.from_numpy(np.ascontiguousarray(weights))
        return tensor.view(torch.bfloat16) if info["type"] == "BF16" else tensor

    def _pread(self, fd: int, info: dict) -> bytearray:
        """The tensor's bytes, read into one fresh buffer (a read returns at most ~2 GiB)."""
        buf = bytearray(info["bytes"])
        view, done = memoryview(buf), 0
        while done < len(buf):
            got = os.preadv(fd, [view[done:]], info["offset"] + done)
            if got == 0:
                raise WeightFileError(
                    f"{self.gguf.name} is truncated: tensor {info['gguf']} ends past its end"
                )
            done += got
        return buf
