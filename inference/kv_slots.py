"""Static KV buffers for captured decode steps: per layer, keys and values of `slots` sessions
at fixed addresses, so that a CUDA graph can read and write them (inference/cuda_graphs.py).

A session of one sequence leases a slot when it opens and keeps its keys and values there
(SessionCache.bind): the varlen forward and the captured decode step use the same memory. The
slot comes back when the session leaves it (it outgrows the slot, or widens) or is dropped.
The last row of every buffer is scratch: padded rows of a captured batch write there.
"""

import threading

import torch


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
            self.pool._free.append(self.slot)


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
        # zeros, not empty: a scratch row is read before anything wrote it (padded rows attend to it)
        self.kv = {
            layer: (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for layer in layers
        }
        self._free = list(reversed(range(slots)))  # pop() hands out slot 0 first
        # reentrant: a Lease's release runs from a weakref finalizer, which the cyclic garbage
        # collector may call inside lease() (an allocation) on the thread that holds the lock
        self._lock = threading.RLock()

    @property
    def scratch(self) -> int:
        return self.slots

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values())

    @property
    def free(self) -> int:
        return len(self._free)

    def lease(self) -> Lease | None:
        """A free slot, or None when every slot is held (the session keeps buffers of its own)."""
        with self._lock:
            return Lease(self, self._free.pop()) if self._free else None

    def views(self, slot: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """A slot's buffers, per global layer: keys and values [1, kv_heads, positions, head_dim]."""
        assert 0 <= slot < self.slots, f"slot {slot} is not one of the pool's {self.slots}"
        return {layer: (k[slot : slot + 1], v[slot : slot + 1]) for layer, (k, v) in self.kv.items()}
