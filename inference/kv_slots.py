"""A pool of KV slots: per layer, keys and values of `slots` sessions in one buffer
[slots + 1, kv_heads, positions, head_dim], so that the decode rows of many sessions are written
with one indexed store and attended in one call (inference/batch.py), and a CUDA graph can read
and write them at fixed addresses (inference/cuda_graphs.py).

A session of one sequence leases a slot when it opens and keeps its keys and values there
(SessionCache.bind): the varlen forward and the captured decode step use the same memory. The
slot comes back when the session leaves it (it outgrows the slot, or widens) or is dropped.
The last row of every buffer is scratch: padded rows of a captured batch write there. On a
CPU the buffers take memory as sessions write them, not before (`_zeros`).
"""

import heapq
import math
import mmap
import threading

import torch

EAGER_POSITIONS = 1024  # positions a slot holds without CUDA graphs (longer sessions leave it)
EAGER_SLOTS = 32  # slots at most; the pool takes at most half the KV budget
EAGER_MIN_SLOTS = 8  # a smaller budget keeps every session in buffers of its own


def eager_pool_shape(max_cache_tokens: int, context: int) -> tuple[int, int] | None:
    """(slots, positions) of the pool a block without CUDA graphs keeps, or None for none."""
    positions = max(1, min(EAGER_POSITIONS, context))
    slots = min(EAGER_SLOTS, max_cache_tokens // 2 // positions)
    return (slots, positions) if slots >= EAGER_MIN_SLOTS else None


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of zeros; on a CPU in anonymous memory, which the kernel hands out zeroed as it is
    first written, so that an idle pool takes no memory."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, max(1, size)), dtype=dtype, count=math.prod(shape)).view(shape)


class Lease:
    """One slot, held by one session; `release` is idempotent (a session may leave its slot
    and later be dropped)."""

    def __init__(self, pool: "SlotPool", slot: int):
        self.pool, self.slot = pool, slot
        self._released = False

    def release(self) -> None:
        with self.pool._lock:
            if self._released:
                return
            self._released = True
            heapq.heappush(self.pool._free, self.slot)


class SlotPool:
    def __init__(
        self,
        layers: range,
        slots: int,
        positions: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        if slots < 1 or positions < 1:
            raise ValueError(f"a slot pool needs slots >= 1 and positions >= 1, got {slots} and {positions}")
        self.layers, self.slots, self.positions = layers, slots, positions
        shape = (slots + 1, kv_heads, positions, head_dim)  # [slots + scratch, kv_heads, positions, d]
        # zeros: padded rows attend to the scratch row, and a shorter row's masked positions are
        # read (a garbage NaN times a zero weight is NaN)
        self.kv = {layer: (_zeros(shape, dtype, device), _zeros(shape, dtype, device)) for layer in layers}
        # a heap: the lowest free slot goes first, so sessions opened in turn hold consecutive
        # slots in their batch's order (a view of the pool, and no reordering of their rows)
        self._free = list(range(slots))
        # reentrant: a Lease's release runs from a weakref finalizer, which the cyclic garbage
        # collector may call inside lease() (an allocation) on the thread that holds the lock
        self._lock = threading.RLock()

    @property
    def scratch(self) -> int:
        return self.slots

    @property
    def device(self) -> torch.device:
        return self.kv[self.layers[0]][0].device

    @property
    def position_bytes(self) -> int:
        """The bytes of one position's keys and values in one layer of a slot."""
        k = self.kv[self.layers[0]][0]
        return 2 * k.shape[1] * k.shape[3] * k.element_size()

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values())

    @property
    def free(self) -> int:
        return len(self._free)

    def lease(self) -> Lease | None:
        """A free slot, or None when every slot is held (the session keeps buffers of its own)."""
        with self._lock:
            return Lease(self, heapq.heappop(self._free)) if self._free else None

    def views(self, slot: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """A slot's buffers, per global layer: keys and values [1, kv_heads, positions, head_dim]."""
        assert 0 <= slot < self.slots, f"slot {slot} is not one of the pool's {self.slots}"
        return {layer: (k[slot : slot + 1], v[slot : slot + 1]) for layer, (k, v) in self.kv.items()}
