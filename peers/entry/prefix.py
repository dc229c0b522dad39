"""Prompt prefixes as chained block hashes (xxhash), the keys under which peers keep and reuse a
prefix's KV, salted per requester (API key, else host) so that no caller reuses, or times, another's
prompt; and the routing key, so that requests sharing a prefix reach the same peers."""

import hashlib
import hmac
import secrets
import struct

import xxhash

from inference.prefix_cache import BLOCK_TOKENS
from peers.transport.auth import requester

ROUTING_BLOCKS = 4  # the routing key covers the prompt's first blocks (128 tokens)
HASH_MASK = (1 << 63) - 1  # a hash fits a signed 64-bit int
# this entry's (this process's) secret: partitions are unguessable, and two entries never share one
_PARTITION_SECRET = secrets.token_bytes(32)


def partition_seed(who: str) -> int:
    """The seed of `who`'s prefix hashes: a keyed digest of the requester, never shared by two."""
    digest = hmac.new(_PARTITION_SECRET, who.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") & HASH_MASK


def prefix_hashes(ids: list[int], who: str | None = None) -> tuple[int, ...]:
    """One hash per full block of BLOCK_TOKENS tokens; each covers every token before it too, and
    the requester `who` (by default the one of the request being served, `requester()`): the same
    tokens of two requesters hash apart, so a peer's prefix cache never lends one's KV to another."""
    out, h = [], partition_seed(requester() if who is None else who)
    for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        block = struct.pack(f"<{BLOCK_TOKENS}q", *ids[start : start + BLOCK_TOKENS])
        h = xxhash.xxh64_intdigest(block, seed=h) & HASH_MASK
        out.append(h)
    return tuple(out)


def routing_key(ids: list[int]) -> str:
    """The same for prompts that share their first ROUTING_BLOCKS blocks (or, if shorter than
    one block, the whole prompt). Not salted: a route depends on the caller's own prompt only, and
    tells nothing of what others asked."""
    lead = ids[: ROUTING_BLOCKS * BLOCK_TOKENS]
    return xxhash.xxh64_hexdigest(struct.pack(f"<{len(lead)}q", *lead))
