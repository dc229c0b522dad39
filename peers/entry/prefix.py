"""Prompt prefixes as chained block hashes (xxhash): the routing key of a request, so that
requests sharing a prefix (a system prompt, a chat history) reach the same peers, and the keys
under which those peers keep and reuse the prefix's KV."""

import struct

import xxhash

from inference.prefix_cache import BLOCK_TOKENS

ROUTING_BLOCKS = 4  # the routing key covers the prompt's first blocks (128 tokens)


def prefix_hashes(ids: list[int]) -> tuple[int, ...]:
    """One hash per full block of BLOCK_TOKENS tokens; each covers every token before it too."""
    out, h = [], 0
    for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        block = struct.pack(f"<{BLOCK_TOKENS}q", *ids[start : start + BLOCK_TOKENS])
        h = xxhash.xxh64_intdigest(block, seed=h) & ((1 << 63) - 1)  # fits a signed 64-bit int
        out.append(h)
    return tuple(out)


def routing_key(ids: list[int]) -> str:
    """The same for prompts that share their first ROUTING_BLOCKS blocks (or, if shorter than
    one block, the whole prompt)."""
    lead = ids[: ROUTING_BLOCKS * BLOCK_TOKENS]
    return xxhash.xxh64_hexdigest(struct.pack(f"<{len(lead)}q", *lead))
