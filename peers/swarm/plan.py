"""`peer plan`: how a model's layers would split over a group of devices, and whether they cover
it. Each layer's bytes come from the model's config alone (the model built on the meta device),
held as a peer holds them (`--quant`, `--dtype`); devices take contiguous layers greedily in order,
each up to its memory less a reserve for the KV cache and activations."""

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PretrainedConfig

from inference.block import DTYPES, load_config
from inference.models import resolve_model
from inference.quant import bytes_per_weight, check_quant

DEFAULT_DTYPE = "bfloat16"  # what a CUDA peer holds unquantized weights in
DEFAULT_RESERVE = 0.10  # of each device's memory, kept for the KV cache and activations
UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of a size such as "24GB", "23.5GiB" or "16000MB" (a unit is required)."""
    match = _SIZE.fullmatch(text)
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"{text!r} is not a size such as 24GB, 24GiB or 16000MB")
    size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return size


def parse_devices(text: str) -> list[int]:
    """The memory in bytes of each device of a comma-separated list ("24GB,24GB,16GB")."""
    entries = text.split(",")
    sizes = []
    for i, entry in enumerate(entries, 1):
        try:
            sizes.append(parse_size(entry))
        except ValueError as e:
            raise ValueError(f"--gpus entry {i} of {len(entries)}: {e}") from None
    return sizes


@dataclass(frozen=True)
class ModelBytes:
    """The bytes a model's parts hold in memory: each decoder layer, what the first layer's device
    holds besides (the embedding), what the last layer's holds (final norm, lm_head), and what one
    device holding both ends keeps once (tied embeddings)."""

    name: str
    model_type: str
    layers: tuple[int, ...]
    first: int
    last: int
    shared: int = 0

    @property
    def total(self) -> int:
        return sum(self.layers) + self.first + self.last - self.shared


def read_config(model: str) -> tuple[str, PretrainedConfig]:
    """A model's name and config: a config.json file or a directory holding one (weights or not),
    else whatever `peer serve --model` accepts. Families a block cannot serve are refused."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".json":
        name = path.resolve().parent.name
    elif path.is_dir() and (path / "config.json").is_file():
        name = path.resolve().name
    else:
        source = resolve_model(model)
        name, path = source.model_id, source.path
    return name, load_config(path)  # (families a block cannot serve are refused there)


def model_bytes(
    name: str, config: PretrainedConfig, quant: str = "none", dtype: str = DEFAULT_DTYPE
) -> ModelBytes:
    """Bytes of each part of the model as a peer holds them: weight matrices (linear layers,
    embeddings, experts) at `quant`'s bytes per weight, vectors (norms, biases) in `dtype`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    per_weight, per_vector = bytes_per_weight(check_quant(quant), DTYPES[dtype]), DTYPES[dtype].itemsize
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    layers = [0.0] * config.num_hidden_layers
    first = last = 0.0
    for param_name, p in model.named_parameters(remove_duplicate=False):
        held = p.numel() * (per_weight if p.dim() >= 2 else per_vector)
        found = re.match(r"model\.layers\.(\d+)\.", param_name)
        if found:
            layers[int(found.group(1))] += held
        elif param_name.startswith(("lm_head.", "model.norm.")):
            last += held
        else:
            first += held
    # tied embeddings (the model on the meta device does not tie them: the config says): one device
    # holding both ends keeps them once, except under int4, where its lm_head is torchao's
    tied = getattr(config, "tie_word_embeddings", False) and quant != "int4"
    shared = model.get_input_embeddings().weight.numel() * per_weight if tied else 0
    return ModelBytes(
        name, config.model_type, tuple(int(b) for b in layers), int(first), int(last), int(shared)
    )


@dataclass(frozen=True)
class DeviceShare:
    device: int  # its place in --gpus
    memory_bytes: int
    capacity_bytes: int  # the memory less the reserve
    start: int
    end: int  # layers start:end (start == end: none)
    used_bytes: int


@dataclass(frozen=True)
class Plan:
    model: str
    model_type: str
    num_layers: int
    quant: str
    dtype: str
    reserve: str  # how much of each device is kept back, in words
    devices: tuple[DeviceShare, ...]
    model_bytes: int
    left_start: int  # layers left_start:num_layers are not covered (num_layers: all are)
    left_bytes: int  # what those layers (and their ends) hold
    left_memory_bytes: int  # the memory of one more device that would hold them, reserve included

    @property
    def covered(self) -> bool:
        return self.left_start == self.num_layers

    def as_dict(self) -> dict:
        return {**asdict(self), "covered": self.covered}


def split_layers(parts: ModelBytes, capacities: list[int]) -> list[tuple[int, int, int]]:
    """Each device's layers (start, end) and bytes, taking contiguous layers greedily in order up
    to its capacity; a device too small for the next layer takes none."""
    count, start, shares = len(parts.layers), 0, []
    for capacity in capacities:
        end, used = start, 0
        while end < count:
            need = parts.layers[end] + (parts.first if end == 0 else 0)
            if end == count - 1:
                need += parts.last - (parts.shared if start == 0 else 0)
            if used + need > capacity:
                break
            used, end = used + need, end + 1
        shares.append((start, end, used))
        start = end
    return shares


def make_plan(
    model: str, gpus: str, quant: str = "none", dtype: str | None = None, reserve_gb: float | None = None
) -> Plan:
    """Split `model` over the devices of `gpus` ("24GB,24GB,16GB"), each keeping back `reserve_gb`
    (default: DEFAULT_RESERVE of its memory) for the KV cache."""
    memories = parse_devices(gpus)
    if reserve_gb is not None and reserve_gb < 0:
        raise ValueError(f"--reserve-gb must be at least 0, got {reserve_gb:g}")
    name, config = read_config(model)
    parts = model_bytes(name, config, quant, dtype or DEFAULT_DTYPE)
    if reserve_gb is None:
        capacities = [int(m * (1 - DEFAULT_RESERVE)) for m in memories]
        reserve = f"{DEFAULT_RESERVE:.0%} of each device"
    else:
        capacities = [max(0, m - int(reserve_gb * 1e9)) for m in memories]
        reserve = f"{reserve_gb:g} GB of each device"
    shares = split_layers(parts, capacities)
    devices = tuple(
        DeviceShare(i, m, c, start, end, used)
        for i, (m, c, (start, end, used)) in enumerate(zip(memories, capacities, shares, strict=True))
    )
    left = devices[-1].end if devices else 0
    count = len(parts.layers)
    left_bytes = 0
    if left < count:
        left_bytes = sum(parts.layers[left:]) + parts.last + (parts.first - parts.shared if left == 0 else 0)
    if reserve_gb is None:
        left_memory = int(left_bytes / (1 - DEFAULT_RESERVE)) + 1 if left_bytes else 0
    else:
        left_memory = left_bytes + int(reserve_gb * 1e9) if left_bytes else 0
    return Plan(
        name, parts.model_type, count, quant, dtype or DEFAULT_DTYPE, reserve, devices,
        parts.total, left, left_bytes, left_memory,
    )  # fmt: skip


def gb(n: int) -> str:
    """Bytes for people, in decimal units: GB, or MB and kB for small models."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size or unit == "kB":
            return f"{n / size:.2f} {unit}"
    raise AssertionError(n)


def format_plan(plan: Plan) -> str:
    """The plan as a table and a verdict line."""
    weights = f"{plan.quant} weights" if plan.quant != "none" else f"{plan.dtype} weights"
    lines = [
        f"{plan.model} ({plan.model_type}): {plan.num_layers} layers, {gb(plan.model_bytes)} as {weights}; "
        f"reserve {plan.reserve} for the KV cache",
        f"{'device':<8}{'memory':>12}{'layers':>10}{'weights':>12}{'free':>12}",
    ]
    for d in plan.devices:
        span = f"{d.start}:{d.end}" if d.end > d.start else "-"
        free = d.capacity_bytes - d.used_bytes
        lines.append(
            f"{'gpu' + str(d.device):<8}{gb(d.memory_bytes):>12}{span:>10}{gb(d.used_bytes):>12}{gb(free):>12}"
        )
    if plan.covered:
        used = sum(1 for d in plan.devices if d.end > d.start)
        lines.append(f"covered: layers 0:{plan.num_layers} fit on {used} device{'s' if used > 1 else ''}")
    else:
        lines.append(
            f"not covered: layers {plan.left_start}:{plan.num_layers} are left ({gb(plan.left_bytes)}); "
            f"one more device of {gb(plan.left_memory_bytes)} would cover them"
        )
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.as_dict(), indent=2)
