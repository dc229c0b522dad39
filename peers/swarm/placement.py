"""Automatic layer choice: the contiguous span that most needs serving (gaps first, then fewest
replicas) within this peer's budget of layers; and `Placement`, which chooses a joining peer's
span and moves a serving one to fill a gap."""

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.block import parse_span, resolve_device
from inference.quant import bytes_per_weight
from inference.weights import checkpoint_weights
from peers.swarm.membership import JOINING, SERVING, PeerRecord, Table
from peers.swarm.routing import coverage, gaps

log = logging.getLogger("layerswarm.peer")


def initial_span(layers: str | None, total: int) -> tuple[int, int]:
    """The span a peer announces as it joins: --layers', or none until it chooses (`Placement`)."""
    if layers is None:
        return 0, 0
    span = parse_span(layers, total)
    return span.start, span.end


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


def layer_budget(
    num_layers: int | None, model_path: Path, config, device: str | None, dtype: str | None, quant: str
) -> int:
    """How many layers this peer serves: --num-layers, else as many as fit its memory."""
    if num_layers is not None:
        return min(num_layers, config.num_hidden_layers)
    return layers_fitting_memory(model_path, config, device, dtype, quant)


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


@dataclass(frozen=True)
class PlacementSettings:
    auto: bool = True  # the peer places itself (no --layers): it may choose and move
    rebalance: bool = True  # --rebalance: a serving peer moves to fill a gap
    interval_s: float = 1.0  # the gossip interval: how long views take to spread
    settle_s: float = 30.0  # serving this long before moving (views agree before acting on them)


class Placement:
    """Where this peer's layers go. `gossip_round(fanout_all)` announces the table's own entry;
    `load()` loads the span of the table's own entry and serves it; `unload()` drops the block
    (steps in flight on it fail over); `budget()` is how many layers this peer can hold;
    `on_fatal(e)` is told when this peer can serve no layers any more."""

    def __init__(
        self,
        table: Table,
        settings: PlacementSettings,
        budget: Callable[[], int],
        gossip_round: Callable[[], Awaitable[object]],
        load: Callable[[], Awaitable[None]],
        unload: Callable[[], None],
        on_fatal: Callable[[Exception], None],
    ):
        self.table, self.settings, self.budget = table, settings, budget
        self.gossip_round, self.load, self.unload, self.on_fatal = gossip_round, load, unload, on_fatal
        self.serving_since: float | None = None  # loop time this span started serving
        self.moving = False

    def serving(self) -> None:
        """The span was loaded and serves from now on."""
        self.serving_since = asyncio.get_running_loop().time()

    async def choose(self, rounds: int = 5) -> None:
        """Pick the span that most needs serving; announce it while joining, and move if a peer
        that chose first claimed the same layers (simultaneous newcomers settle in a few rounds)."""
        me, interval = self.table.me, self.settings.interval_s
        budget = self.budget()
        await asyncio.sleep(interval * random.uniform(1.0, 2.0))  # learn the swarm first
        for _ in range(rounds):
            span = choose_span(self.table, me.model, me.total_layers, budget)
            if span == (self.table.me.start, self.table.me.end):
                return
            log.info("choosing layers %d:%d", *span)
            self.table.update_me(start=span[0], end=span[1])
            await self.gossip_round()
            await asyncio.sleep(2 * interval)

    async def rebalance(self) -> None:
        """An automatically placed peer whose layers others also serve moves to fill a gap; if
        the new layers cannot be loaded it goes back to the old ones, and if that fails too the
        peer stops (on_fatal) rather than stay `joining` for ever."""
        me, s = self.table.me, self.settings
        if self.moving or me.state != SERVING or not s.auto or not s.rebalance:
            return
        if asyncio.get_running_loop().time() - (self.serving_since or 0) < s.settle_s:
            return
        target = rebalance_target(self.table, me.model, me.total_layers)
        if target is None:
            return
        self.moving = True
        try:
            await self._move((me.start, me.end), target)
        finally:
            self.moving = False

    async def _move(self, old: tuple[int, int], target: tuple[int, int]) -> None:
        log.info("moving from layers %d:%d to %d:%d to fill a gap", *old, *target)
        self.unload()
        self.table.update_me(state=JOINING, start=target[0], end=target[1])
        await self.gossip_round()
        try:
            await self.load()
        except Exception:
            log.exception("loading layers %d:%d failed; going back to %d:%d", *target, *old)
            self.table.update_me(state=JOINING, start=old[0], end=old[1])
            try:
                await self.load()
            except Exception as e:
                log.exception("reloading layers %d:%d failed too; this peer stops", *old)
                self.on_fatal(e)
                raise
