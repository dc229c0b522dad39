"""A block's decode step captured as CUDA graphs: one position for each of B sessions (B padded
up to 1, 2, 4, 8 or 16), all the block's layers in one replay, over static KV slots
(inference/kv_slots.py). No Python runs per layer or per session, and nothing waits for the
GPU: the one host sync left is the scheduler's copy of the output, the frame it sends on.

Which steps: decode steps (one position) of sessions of one sequence holding a slot, running
the block's whole span. Prefill chunks, drafted steps, sessions of several sequences or past a
slot's positions take the varlen forward (inference/batch.py) on the same KV memory. A graph is
captured per (batch size, attended-length bucket) at its first use, and that first replay is
compared with the same step run eagerly: a difference or a failure turns graphs off for the
block (logged) and the eager output is used, so a capture problem costs speed, not tokens.

Without capture (a CPU, or `capture=False`) the same static step runs eagerly: the tests check
its bookkeeping and its outputs against the varlen forward that way.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_slots import SlotPool

log = logging.getLogger("layerswarm.inference")

CHECK_TOLERANCE = 0.05  # of the eager output's largest magnitude: a broken graph is off by O(1)


@dataclass(frozen=True)
class GraphSettings:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)  # a decode batch is padded up to one of these
    positions: int = 2048  # positions a slot holds (at most the model's context)
    slots: int = 32  # sessions holding slots at once; others keep buffers of their own
    shortest: int = 256  # the shortest attended-length bucket; buckets double up to `positions`
    check: bool = True  # compare each graph's first replay with the eager step

    def __post_init__(self):
        sizes = self.batch_sizes
        if not sizes or min(sizes) < 1 or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"batch_sizes must be distinct positive sizes in increasing order, got {sizes}")
        for name in ("positions", "slots", "shortest"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def within(cls, max_cache_tokens: int, context: int) -> "GraphSettings":
        """The defaults, with slots holding at most half the KV budget (DecodeGraphs takes the
        pool's positions out of the block's budget; the rest is for sessions without a slot)
        and no longer than the model's context."""
        positions = min(cls.positions, context, max(1, max_cache_tokens // 2))
        return cls(positions=positions, slots=max(1, min(cls.slots, max_cache_tokens // 2 // positions)))


def padded_batch(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest of `sizes` that holds n rows."""
    assert 0 < n <= sizes[-1], f"{n} rows for batch sizes {sizes}"
    return next(size for size in sizes if size >= n)


def length_bucket(needed: int, shortest: int, positions: int) -> int:
    """How many positions of its slot a step attends to: `shortest` doubled until it covers
    `needed`, at most `positions`."""
    assert 0 < needed <= positions, f"{needed} positions needed of a slot of {positions}"
    length = shortest
    while length < needed:
        length *= 2
    return min(length, positions)


class StaticDecode:
    """transformers' Cache protocol and the attention hook of inference/batch.py for one static
    step: row b writes its new keys and values at (slots[b], pos[b]) and attends to the first
    `length` positions of its slot, up to its own (and within the layer's window)."""

    def __init__(
        self,
        pool: SlotPool,
        pos: torch.Tensor,
        slots: torch.Tensor,
        length: int,
        windows: dict[int, int | None],
    ):
        self.pool, self.pos, self.slots, self.length, self.windows = pool, pos, slots, length, windows
        keys = torch.arange(length, device=pos.device)[None, :]  # [1, L]
        causal = keys <= pos[:, None]  # [B, L]
        self._masks = {}  # window -> [B, 1, 1, L], True = attend
        for window in set(windows.values()):
            allowed = causal if window is None else causal & (pos[:, None] - keys < window)
            self._masks[window] = allowed[:, None, None, :]
        self.updated: set[int] = set()

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: [1, kv_heads, B, d]
        k, v = self.pool.kv[layer_idx]
        k[self.slots, :, self.pos] = key[0].transpose(0, 1)  # [B, kv_heads, d]
        v[self.slots, :, self.pos] = value[0].transpose(0, 1)
        self.updated.add(layer_idx)
        return key, value

    def attend(self, module, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """query [1, heads, B, d] -> [1, B, heads, d]. The query heads that share a KV head are
        that head's queries (decode: one position each), so no keys are repeated."""
        k, v = self.pool.kv[module.layer_idx]
        keys = k[self.slots, :, : self.length]  # [B, kv_heads, L, d]
        values = v[self.slots, :, : self.length]
        _, heads, batch, dim = query.shape
        kv_heads = keys.shape[1]
        q = query[0].transpose(0, 1).reshape(batch, kv_heads, heads // kv_heads, dim)
        mask = self._masks[self.windows[module.layer_idx]]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(batch, heads, dim)[None]


def graph_problem(block) -> str | None:
    """Why this block's decode step cannot be captured, or None."""
    if block.rope_per_sequence:  # ("dynamic" rotary embeddings are refused at load: get_family)
        return f"its rotary embedding ({block.rotary.rope_type!r}) changes with the sequence length"
    if block.family.moe:
        return "its mixture of experts picks experts per token (a shape a graph cannot fix)"
    if any(getattr(layer.self_attn, "sinks", None) is not None for layer in block.layers):
        return "the static decode step has no attention sinks"
    if block.latent:
        return "the static decode step has no multi-head latent attention"
    return None


class DecodeGraphs:
    """The static slots, input buffers and captured graphs of one block."""

    def __init__(self, block, settings: GraphSettings = GraphSettings(), capture: bool = True):
        config, span = block.config, block.span
        self.block, self.settings, self.capture = block, settings, capture
        positions = min(settings.positions, getattr(config, "max_position_embeddings", settings.positions))
        # the slots sessions lease (Sessions.enable_pool takes their positions out of the budget)
        self.pool = block.kv.enable_pool(config, block.dtype, block.device, settings.slots, positions)
        self.windows = dict(zip(range(span.start, span.end), block.windows, strict=True))
        largest, device = settings.batch_sizes[-1], block.device
        if span.is_first:
            self.inputs = torch.zeros(largest, dtype=torch.long, device=device)  # token ids [B]
        else:
            self.inputs = torch.zeros(largest, config.hidden_size, dtype=block.dtype, device=device)  # [B, H]
        self.meta = torch.zeros(2, largest, dtype=torch.long, device=device)  # positions, slots [2, B]
        self.meta[1] = self.pool.scratch
        self._staging: list[tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]] = []  # per chunk
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = None
        self.enabled = True
        self.steps = 0  # decode steps run through the static step
        self.replays = 0  # of them, by replaying a captured graph

    def to_json(self) -> dict:
        """What /health reports: whether graphs run, what they ran, the slots."""
        return {
            "enabled": self.enabled,
            "captured": self.capture,
            "graphs": len(self._graphs),
            "steps": self.steps,
            "replays": self.replays,
            "slots": self.pool.slots,
            "slots_free": self.pool.free,
            "slot_positions": self.pool.positions,
            "slot_bytes": self.pool.nbytes,
        }

    def forward(self, layers: tuple[int, int], items: list, eager: Callable[[list], list]) -> list:
        """Outputs of one layer range's (Step, SessionCache) items, as Block._run gives them: the
        decode steps these graphs take run here, the others through `eager` (the varlen forward)."""
        span = self.block.span
        taken = []
        if self.enabled and layers == (span.start, span.end):
            taken = [i for i, (step, session) in enumerate(items) if self._takes(step, session)]
        if not taken:
            return eager(items)
        outs: list = [None] * len(items)
        rest = sorted(set(range(len(items))) - set(taken))
        if rest:
            for i, out in zip(rest, eager([items[i] for i in rest]), strict=True):
                outs[i] = out
        largest = self.settings.batch_sizes[-1]
        for chunk, start in enumerate(range(0, len(taken), largest)):
            ids = taken[start : start + largest]
            for i, out in zip(ids, self._run(chunk, [items[i] for i in ids]), strict=True):
                outs[i] = out
        return outs

    def _takes(self, step, session) -> bool:
        return (
            step.inputs.shape[:2] == (1, 1)
            and session.lease is not None
            and session.batch == 1
            and session.length < self.pool.positions
        )

    def _run(self, chunk: int, items: list) -> list[torch.Tensor]:
        n = len(items)
        batch = padded_batch(n, self.settings.batch_sizes)
        needed = max(session.length for _, session in items) + 1
        length = length_bucket(needed, self.settings.shortest, self.pool.positions)
        self._stage(chunk, items, batch)
        key = (batch, length)
        if key in self._graphs:
            graph, out = self._graphs[key]
            graph.replay()
            self.replays += 1
        elif self.capture:
            out = self._capture_checked(batch, length, n)
        else:
            out = self._step(batch, length)
        self.steps += n
        out = out[:n].clone()  # [n, H] or logits [n, V]; the graph's buffer is overwritten next replay
        results = []
        for i, (step, session) in enumerate(items):
            results.append(out[i : i + 1].view(1, 1, -1))
            session.advance(1)
            session.rewind_floor = step.position + 1 if step.drafted else None
        return results

    def _stage(self, chunk: int, items: list, batch: int) -> None:
        """Copy the rows' inputs, positions and slots into the static buffers (padded rows:
        position 0 of the scratch slot), from pinned host buffers without waiting on a GPU."""
        n = len(items)
        x = torch.cat([step.inputs.reshape(1, -1) for step, _ in items])  # [n, 1] ids or [n, H]
        x = x.reshape(n) if self.inputs.dim() == 1 else x
        meta = torch.tensor(
            [
                [s.length for _, s in items] + [0] * (batch - n),
                [s.slot for _, s in items] + [self.pool.scratch] * (batch - n),
            ]
        )
        if self.inputs.device.type != "cuda" or x.device.type != "cpu":
            self.inputs[:n].copy_(x)
            self.meta[:, :batch].copy_(meta)
            return
        while len(self._staging) <= chunk:
            self._staging.append(
                (
                    torch.empty(self.inputs.shape, dtype=self.inputs.dtype, pin_memory=True),
                    torch.empty(self.meta.shape, dtype=torch.long, pin_memory=True),
                    torch.cuda.Event(),
                )
            )
        host_x, host_meta, copied = self._staging[chunk]
        copied.synchronize()  # the previous forward's copy from these buffers (long done)
        host_x[:n].copy_(x)
        host_meta[:, :batch].copy_(meta)
        self.inputs[:n].copy_(host_x[:n], non_blocking=True)
        self.meta[:, :batch].copy_(host_meta[:, :batch], non_blocking=True)
        copied.record()

    def _step(self, batch: int, length: int) -> torch.Tensor:
        """The static step on the first `batch` rows of the buffers: hidden states [B, H], or
        float32 logits [B, V] at the model's last layer."""
        block = self.block
        x, pos, slots = self.inputs[:batch], self.meta[0, :batch], self.meta[1, :batch]
        hidden = (block.embed_tokens(x) if block.span.is_first else x)[None]  # [1, B, H]
        position_ids = pos[None]  # [1, B]
        cos_sin = block.position_embeddings(hidden, position_ids, [batch])
        cache = StaticDecode(self.pool, pos, slots, length, self.windows)
        for layer, kind in zip(block.layers, block.layer_types, strict=True):
            hidden = layer(
                hidden,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                position_embeddings=cos_sin[kind],
                batch=cache,
            )
        if cache.updated != set(self.windows):
            raise RuntimeError(
                f"layers {sorted(set(self.windows) - cache.updated)} ran without the static slots"
            )
        if not block.span.is_last:
            return hidden[0]
        return block.logits(hidden[0])

    def _capture_checked(self, batch: int, length: int, rows: int) -> torch.Tensor:
        """Capture the step for (batch, length) on the staged inputs and replay it once against
        the eager step; on any difference or failure, graphs are off for this block."""
        expected = self._step(batch, length).clone()  # writes the keys and values the graph rewrites
        try:
            graph, out = self._capture(batch, length)
            graph.replay()
            problem = _difference(out[:rows], expected[:rows]) if self.settings.check else None
        except Exception as e:  # a capture that fails must cost speed, not the step
            problem = f"failed: {type(e).__name__}: {e}"
        if problem is None:
            self._graphs[(batch, length)] = (graph, out)
            self.replays += 1
            return out
        log.error(
            "CUDA graphs are off for layers %s: the captured decode step (batch %d, %d positions) %s; "
            "decoding runs eagerly",
            self.block.span,
            batch,
            length,
            problem,
        )
        self.enabled = False
        self._graphs.clear()
        return self._step(batch, length)  # rewrites this step's keys and values eagerly

    def _capture(self, batch: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        with torch.cuda.device(self.block.device):
            warm = torch.cuda.Stream()
            warm.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(warm):  # lazy initialisations and kernel choices happen here
                for _ in range(2):
                    self._step(batch, length)
            torch.cuda.current_stream().wait_stream(warm)
            if self._mempool is None:
                self._mempool = torch.cuda.graph_pool_handle()  # one pool: graphs never run at once
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
                out = self._step(batch, length)
        return graph, out


def _difference(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """How a graph's output differs from the eager step's, or None if they agree."""
    if bool(torch.isfinite(want).all()) and not bool(torch.isfinite(got).all()):
        return "gave non-finite values"
    scale = float(want.float().abs().max().clamp_min(1e-6))
    err = float((got.float() - want.float()).abs().max())
    if not err <= CHECK_TOLERANCE * scale:
        return f"differs from the eager step by {err:.3g} (largest magnitude {scale:.3g})"
    return None
