"""One forward of a block over the steps of many sessions at once (continuous batching).

The steps are laid end to end as one sequence [1, N, H] (N = the sum of every step's B x T
positions): norms, projections and MLPs run on all positions together, and attention runs per
sequence against that sequence's own KV cache (varlen attention), so sessions of different
lengths, decode steps and prefill chunks share one forward without padding.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .kv_cache import LOCAL, Sender, SessionCache

ATTENTION = "layerswarm_varlen"
# pooled decode rows attend to the longest one's keys, the others' masked: at most this share of
# them, or more while the masked keys cost less to read than the attention calls the rows would
# make one by one (~30 us a call on a CPU core, in bytes read at ~10 GB/s)
POOLED_PADDING = 0.25
CALL_BYTES = 300_000


@dataclass
class Step:
    """One session's step through a block: prefill or prefill chunk (T > 1) or decode (T = 1)."""

    session_id: str
    inputs: torch.Tensor  # token ids [B, T] at layer 0, hidden states [B, T, H] after
    position: int  # the index of the first of the T positions in the session
    layers: tuple[int, int] | None = None  # global layers [a, b) to run; the block's span if None
    last_only: bool = True  # at the model's last layer: logits of the last position only
    drafted: bool = False  # its last positions are drafted tokens: the next step may start inside it
    rewind: bool = False  # it may start at any earlier position (a caller's own session, never a frame)
    sender: Sender = LOCAL  # who sent it: a session it opens counts against that sender's share


@dataclass
class Segment:
    """One sequence (a row of a step) inside the flat batch."""

    cache: SessionCache
    row: int
    offset: int  # where its positions start in the flat sequence
    steps: int  # T
    past: int  # positions cached before this step


class BatchCache:
    """transformers' Cache protocol for the flat batch: each layer's new keys and values are
    written into the sessions' own buffers; attention reads them back per sequence."""

    def __init__(
        self,
        segments: list[Segment],
        windows: dict[int, int | None],
        latent: frozenset[int] = frozenset(),
        pool=None,
    ):
        self.segments = segments
        self.windows = windows  # global layer -> sliding window or None
        # layers whose cache holds a compressed latent (multi-head latent attention): `update`
        # returns every sequence's whole latent history, end to end, for the layer to expand
        self.latent = latent
        self.history: list[int] = []  # where each segment's history starts in what update returned
        self.updated: set[int] = set()
        # decode rows whose sessions hold slots of the block's pool (inference/kv_slots.py): written
        # with one indexed store and attended in one call per layer; the rest one by one
        self.pooled = Pooled.of(segments, pool, windows)
        self.rest = self.pooled.others if self.pooled else segments

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: [1, kv_heads, N, head_dim] (a latent layer's: [1, 1, N, rank] and [1, 1, N, rope])
        if self.pooled:
            self.pooled.write(layer_idx, key, value)
        for s in self.rest:
            s.cache.write(
                layer_idx,
                s.row,
                s.past,
                key[:, :, s.offset : s.offset + s.steps],
                value[:, :, s.offset : s.offset + s.steps],
            )
        self.updated.add(layer_idx)
        if layer_idx not in self.latent:
            return key, value
        reads = [s.cache.read(layer_idx, s.row, s.past + s.steps) for s in self.segments]
        self.history = [0]
        for s in self.segments[:-1]:
            self.history.append(self.history[-1] + s.past + s.steps)
        return torch.cat([k for k, _ in reads], dim=2), torch.cat([v for _, v in reads], dim=2)


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [1, heads, N, d] -> ([1, N, heads, d], None): each sequence attends to its cache."""
    batch: BatchCache = kwargs["batch"]
    if hasattr(batch, "attend"):  # a captured decode step's static slots (inference/cuda_graphs.py)
        return batch.attend(module, query, scaling), None
    layer = module.layer_idx
    if layer not in batch.updated:  # e.g. a transformers release that does not pass `cache` on
        raise RuntimeError(f"layer {layer} ran attention without this step's KV cache")
    window = batch.windows.get(layer)
    sinks, softcap = kwargs.get("s_aux"), kwargs.get("softcap")
    # the fused kernel, unless the layer needs what it lacks (_explicit_attention)
    fused = sinks is None and softcap is None and value.shape[-1] == query.shape[-1]
    if layer in batch.latent and sinks is None and (rows := _latent_rows(batch, window, query, key, value)):
        q, k, v = rows  # [heads, n, ...]: the rows are the batch dimension after the heads
        if fused:
            out = F.scaled_dot_product_attention(q, k, v, scale=scaling)
        else:
            out = _explicit_attention(q, k, v, None, scaling, None, softcap)
        return out[:, :, 0].transpose(0, 1)[None], None  # [1, n, heads, d]
    outs = []
    for i, s in enumerate(batch.rest):  # (all segments when the block has latent layers: no pool)
        end = s.past + s.steps
        if layer in batch.latent:  # keys and values expanded from the whole latent history
            start = batch.history[i]
            k, v = key[:, :, start : start + end], value[:, :, start : start + end]
        else:
            k, v = s.cache.read(layer, s.row, end)  # [1, kv_heads, end, d]
        q = query[:, :, s.offset : s.offset + s.steps]
        mask, causal = None, False
        if s.steps == 1:
            if window is not None and end > window:
                k, v = k[:, :, end - window :], v[:, :, end - window :]
        elif window is None and s.past == 0 and fused:
            causal = True
        else:
            mask = _mask(s.past, s.steps, window, q.device)
        if fused:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=True
            )
        else:
            out = _explicit_attention(q, k, v, mask, scaling, sinks, softcap)
        outs.append(out)
    if not batch.pooled:
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.transpose(1, 2).contiguous(), None
    pooled = batch.pooled.attend(layer, query, scaling, sinks, softcap, fused)  # [n, heads, d]
    if not outs and batch.pooled.every_row(query.shape[2]):
        return pooled[None], None
    whole = query.new_empty(1, query.shape[2], query.shape[1], pooled.shape[-1])  # [1, N, heads, d]
    whole[0, batch.pooled.rows] = pooled
    for s, out in zip(batch.rest, outs, strict=True):
        whole[0, s.offset : s.offset + s.steps] = out[0].transpose(0, 1)
    return whole, None


def _latent_rows(batch: BatchCache, window: int | None, query, key, value):
    """Decode rows of one length in a latent layer, as one batch: (q [heads, n, 1, d], k and v
    [heads, n, T, d]: views of the histories expanded end to end, heads first so that the batch
    dimensions fold into one without a copy), or None for any other mix."""
    rest = batch.rest
    if batch.pooled or window is not None or len(rest) < 2:
        return None
    end = rest[0].past + 1
    if any(s.steps != 1 or s.past + 1 != end for s in rest) or key.shape[2] != len(rest) * end:
        return None
    heads, n = key.shape[1], len(rest)
    k = key[0].reshape(heads, n, end, -1)
    v = value[0].reshape(value.shape[1], n, end, -1)
    return query[0][:, :, None], k, v


class Pooled:
    """Decode rows (one position each) of sessions whose keys and values live in slots of one
    pool, in slot order: one indexed store writes them all, and each layer attends to the slots
    in one call (a view of the pool's rows when the slots are consecutive), each row masked to
    its own length and window."""

    def __init__(self, pool, members: list[Segment], others: list[Segment], windows: dict[int, int | None]):
        self.pool, self.others, self.windows = pool, others, windows
        device = pool.device
        slots = [s.cache.slot for s in members]
        offsets = [s.offset for s in members]
        self.ends = ends = [s.past + 1 for s in members]
        _, kv_heads, size, _ = pool.kv[pool.layers[0]][0].shape  # (the pool's layers share one shape)
        self.longest, shortest = max(ends), min(ends)
        first = slots[0]  # consecutive slots are a view of the pool; others are gathered
        self.view = (
            slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None
        )
        start = offsets[0]
        contiguous = offsets == list(range(start, start + len(offsets)))
        self.rows = slice(start, start + len(offsets)) if contiguous else torch.tensor(offsets, device=device)
        # tensors only where slices will not do (building them costs more than the store)
        lengths = None if shortest == self.longest else torch.tensor(ends, device=device)
        # where the rows write: consecutive slots at one position are a slice (an indexed store is slower)
        if self.view is not None and lengths is None:
            self.slots, self.at = None, (self.view, slice(None), self.longest - 1)
        else:
            self.slots = torch.tensor(slots, device=device)
            positions = (
                torch.full((len(ends),), self.longest - 1, device=device) if lengths is None else lengths - 1
            )
            # the rows' positions of each KV head, as rows of the pool seen as [-1, d] (one
            # index_copy_: an indexed store with a slice between its indices costs more)
            heads = torch.arange(kv_heads, device=device)[None, :]
            self.at = ((self.slots[:, None] * kv_heads + heads) * size + positions[:, None]).flatten()
        # window -> (first key, mask, None), or (0, mask, positions [n, window]) where each row
        # gathers its own window's keys: a window much shorter than the rows' spread
        self.masks: dict[int | None, tuple[int, torch.Tensor | None, torch.Tensor | None]] = {}
        for window in set(windows.values()):
            first_key = 0 if window is None else max(0, shortest - window)
            if shortest == self.longest and (window is None or first_key == self.longest - window):
                self.masks[window] = (first_key, None, None)  # every row attends to the same keys
                continue
            if lengths is None:
                lengths = torch.tensor(ends, device=device)
            if window is not None and self.longest - first_key > 2 * window:
                if self.slots is None:
                    self.slots = torch.tensor(slots, device=device)
                at = (lengths - window).clamp(min=0)[:, None] + torch.arange(window, device=device)[None, :]
                inside = None if shortest >= window else (at < lengths[:, None])[:, None, None, :]
                # each row's window of each KV head, as rows of the pool seen as [-1, d]: one
                # index_select (an indexed read with a slice between its indices costs ~6x)
                heads = torch.arange(kv_heads, device=device)[None, :, None]
                flat = ((self.slots[:, None, None] * kv_heads + heads) * size + at[:, None, :]).flatten()
                self.masks[window] = (0, inside, flat)  # (no mask where every row fills its window)
                continue
            keys = torch.arange(first_key, self.longest, device=device)[None, :]
            allowed = keys < lengths[:, None]
            if window is not None:
                allowed &= keys >= lengths[:, None] - window
            self.masks[window] = (first_key, allowed[:, None, None, :], None)  # [n, 1, 1, keys]

    @classmethod
    def of(cls, segments: list[Segment], pool, windows: dict[int, int | None]) -> "Pooled | None":
        """The pooled rows of a batch, or None when fewer than two rows hold slots of `pool`, or
        when their lengths differ so much that attending to the longest would cost more than
        attending one by one (more than POOLED_PADDING of the keys masked, and more bytes of masked
        keys and values than CALL_BYTES for each call saved)."""
        if pool is None:
            return None
        members = [
            s for s in segments if s.steps == 1 and s.cache.lease is not None and s.cache.lease.pool is pool
        ]
        if len(members) < 2:
            return None
        longest = max(s.past + 1 for s in members)
        masked = longest * len(members) - sum(s.past + 1 for s in members)
        if masked > POOLED_PADDING * longest * len(members) and (
            masked * pool.position_bytes > (len(members) - 1) * CALL_BYTES
        ):
            return None
        taken = {id(s) for s in members}
        members.sort(key=lambda s: s.cache.slot)
        return cls(pool, members, [s for s in segments if id(s) not in taken], windows)

    def every_row(self, n: int) -> bool:
        """Whether the pooled rows are the batch's n rows in their order (a slice, never compared
        as a tensor: comparing a tensor with a slice costs ~0.1 ms)."""
        return isinstance(self.rows, slice) and self.rows == slice(0, n)

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the rows' new keys and values (of [1, kv_heads, N, d]) at their slots' positions."""
        k, v = self.pool.kv[layer]
        new_k, new_v = (
            key[0, :, self.rows].transpose(0, 1),
            value[0, :, self.rows].transpose(0, 1),
        )  # [n, kv_heads, d]
        if isinstance(self.at, tuple):
            k[self.at], v[self.at] = new_k, new_v
        else:
            k.view(-1, k.shape[-1]).index_copy_(0, self.at, new_k.reshape(-1, k.shape[-1]))
            v.view(-1, v.shape[-1]).index_copy_(0, self.at, new_v.reshape(-1, v.shape[-1]))

    def attend(self, layer, query, scaling, sinks, softcap, fused: bool) -> torch.Tensor:
        """query [1, heads, N, d] -> the pooled rows' outputs [n, heads, d]."""
        k, v = self.pool.kv[layer]
        first_key, mask, at = self.masks[self.windows[layer]]
        if at is not None:  # each row's own window: [n, kv_heads, window, d]
            shape = (len(self.ends), k.shape[1], -1, k.shape[-1])
            keys = k.view(-1, k.shape[-1]).index_select(0, at).view(shape)
            values = v.view(-1, v.shape[-1]).index_select(0, at).view(shape)
        else:
            rows = self.view if self.view is not None else self.slots
            keys, values = k[rows, :, first_key : self.longest], v[rows, :, first_key : self.longest]
        q = query[0, :, self.rows].transpose(0, 1)  # [n, heads, d]
        n, heads, dim = q.shape
        if not fused:
            return _explicit_attention(q[:, :, None], keys, values, mask, scaling, sinks, softcap)[:, :, 0]
        # the query heads that share a KV head are that head's queries: no keys are repeated
        q = q.reshape(n, keys.shape[1], heads // keys.shape[1], dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(n, heads, dim)


def _explicit_attention(q, k, v, mask, scaling, sinks, softcap) -> torch.Tensor:
    """Attention written out, for what the fused kernel lacks: values narrower than keys
    (multi-head latent attention's, DeepSeek-V3), scores soft-capped
    (cap * tanh(s / cap)) and attention sinks (one learned logit per head that takes part in the
    softmax and adds nothing to the output; GPT-OSS), as the families' own eager code does it."""
    # the query heads that share a KV head are that head's rows: no keys or values are repeated
    batch, heads, steps, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads * steps, dim)
    scores = torch.matmul(grouped, k.transpose(2, 3)).view(batch, heads, steps, keys)
    scores = scores * (scaling if scaling is not None else dim**-0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], -1).to(scores.dtype)
        scores = torch.cat([scores, sink], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probs = F.softmax(scores, dim=-1, dtype=scores.dtype)[..., :-1]
    else:
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = probs.to(v.dtype).reshape(batch, kv_heads, heads // kv_heads * steps, keys)
    return torch.matmul(probs, v).view(batch, heads, steps, v.shape[-1])


def _mask(past: int, steps: int, window: int | None, device) -> torch.Tensor:
    """Boolean mask [T, past + T] (True = attend)."""
    query = torch.arange(past, past + steps, device=device)[:, None]
    key = torch.arange(past + steps, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= query - key < window
    return allowed


AttentionInterface.register(ATTENTION, varlen_attention)
