"""Automatic layer choice: the contiguous span that most needs serving (gaps first, then fewest
replicas) within this peer's budget of layers."""

from pathlib import Path

import torch

from inference.block import resolve_device
from inference.quant import bytes_per_weight
from inference.weights import checkpoint_weights
from peers.swarm.membership import JOINING, SERVING, PeerRecord, Table
from peers.swarm.routing import coverage, gaps


def best_span(counts: list[int], budget: int) -> tuple[int, int]:
    """The window of `budget` layers with the most unserved layers, then the fewest replicas."""
    total = len(counts)
    budget = max(1, min(budget, total))

    def score(start: int) -> tuple[int, int, int]:
        window = counts[start : start + budget]
        return (-sum(1 for n in window if n == 0), sum(window), start)

    start = min(range(total - budget + 1), key=score)
    return start, start + budget


def claims(table: Table, model: str) -> list[PeerRecord]:
    """Spans this peer must respect: those of peers serving the model, and of peers loading it
    that chose before it could (a smaller id breaks ties between simultaneous newcomers)."""
    me = table.me
    return [
        e
        for e in table.live()
        if e.model == model
        and e.peer_id != me.peer_id
        and e.start < e.end
        and (e.state == SERVING or (e.state == JOINING and e.peer_id < me.peer_id))
    ]


def choose_span(table: Table, model: str, total: int, budget: int) -> tuple[int, int]:
    return best_span(coverage(claims(table, model), total), budget)


def layers_fitting_memory(
    model_path: Path,
    config,
    device: str | None,
    dtype: str | None = None,
    quant: str = "none",
    fraction: float = 0.6,
) -> int:
    """How many layers fit in `fraction` of the free memory of the device (at least one), each
    layer's weights held in `dtype` (the device's default) or quantized (`quant`)."""
    _, dt = resolve_device(device, dtype)
    weights = checkpoint_weights(Path(model_path)) * bytes_per_weight(quant, dt)
    per_layer = max(1, int(weights) // max(1, config.num_hidden_layers))
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
    else:
        free = _mem_available()
    return max(1, min(config.num_hidden_layers, int(free * fraction) // per_layer))


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def rebalance_target(table: Table, model: str, total: int) -> tuple[int, int] | None:
    """Where this serving peer should move, or None to stay: somewhere that covers unserved layers,
    and only if every layer of its own span stays served by peers with smaller ids (the smallest-id
    server of any layer never moves, so moving never opens a gap)."""
    me = table.me
    claimed = claims(table, model)
    if not gaps(coverage([*claimed, me], total)):
        return None
    smaller = [e for e in table.serving(model) if e.peer_id < me.peer_id]
    if any(n == 0 for n in coverage(smaller, total)[me.start : me.end]):
        return None
    target = best_span(coverage(claimed, total), me.end - me.start)
    return target if target != (me.start, me.end) else None
