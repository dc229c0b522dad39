"""KV of prompt prefixes a block computed before, kept for reuse: one entry per block of
BLOCK_TOKENS tokens, keyed by the layers and a hash that covers the whole prefix up to that
block's end (so a hit on block i implies the same tokens 0..i). Bounded in token slots, LRU."""

import threading
from collections import OrderedDict

import torch

BLOCK_TOKENS = 32


class PrefixCache:
    def __init__(self, max_tokens: int):
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        # (layers, hash) -> {layer: (keys, values) [1, kv_heads, BLOCK_TOKENS, head_dim]}
        self._blocks: OrderedDict[tuple, dict[int, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # positions restored from the cache
        self.misses = 0  # positions looked for but absent

    def __len__(self) -> int:
        return len(self._blocks)

    def to_json(self) -> dict:
        """The blocks held and the prompt positions they saved or missed (for /metrics behind its
        key: never on the open /health, where a hit would tell one caller what another sent)."""
        return {"blocks": len(self), "hit_positions": self.hits, "miss_positions": self.misses}

    def match(self, layers: tuple[int, int], hashes: tuple[int, ...]) -> int:
        """How many leading blocks of `hashes` are held."""
        with self._lock:
            n = 0
            while n < len(hashes) and (layers, hashes[n]) in self._blocks:
                n += 1
            return n

    def restore(self, session, layers: tuple[int, int], hashes: tuple[int, ...]) -> None:
        """Write the KV of these (held) blocks into `session` at positions 0.. ."""
        with self._lock:
            for i in reversed(range(len(hashes))):  # the head of a chain ends most recently used
                kv = self._blocks[(layers, hashes[i])]
                self._blocks.move_to_end((layers, hashes[i]))
                for layer, (k, v) in kv.items():
                    session.write(layer, 0, i * BLOCK_TOKENS, k, v)
        self.hits += len(hashes) * BLOCK_TOKENS

    def store(self, session, layers: tuple[int, int], hashes: tuple[int, ...]) -> None:
        """Keep copies of the session's KV for each of these blocks not yet held."""
        if self.max_tokens < BLOCK_TOKENS:
            return
        with self._lock:
            # tail first, so that eviction (least recently used first) takes a chain's tail before
            # its head: a hit needs the leading blocks
            for i in reversed(range(len(hashes))):
                h = hashes[i]
                key = (layers, h)
                if key in self._blocks:
                    self._blocks.move_to_end(key)
                    continue
                end = (i + 1) * BLOCK_TOKENS
                self._blocks[key] = {
                    layer: tuple(
                        t[:, :, end - BLOCK_TOKENS : end].clone() for t in session.read(layer, 0, end)
                    )
                    for layer in range(*layers)
                }
                while len(self._blocks) * BLOCK_TOKENS > self.max_tokens:
                    self._blocks.popitem(last=False)
