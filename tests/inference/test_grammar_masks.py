"""A grammar's mask in its transport form (inference/grammar.py): packing round-trips, hostile
packed masks are refused with a reason, and apply_mask keeps exactly the allowed logits."""

import base64
import random
import zlib

import numpy as np
import pytest
import torch

from inference.grammar import apply_mask, mask_bytes, pack_mask, unpack_mask


def test_pack_unpack_round_trip():
    rng = random.Random(0)
    for vocab_size in (49152, 100, 33):
        size = mask_bytes(vocab_size)
        bits = [rng.random() < 0.3 for _ in range(vocab_size)]
        bits[0] = True
        mask = np.packbits(
            np.array(bits + [False] * (8 * size - vocab_size), np.uint8), bitorder="little"
        ).tobytes()
        text = pack_mask(mask)
        assert text.isascii() and unpack_mask(text, vocab_size) == mask
    full = bytes([0xFF]) * 6144
    assert len(pack_mask(full)) < 100  # compression pays


def test_unpack_refuses_hostile_masks():
    vocab_size, size = 100, mask_bytes(100)
    ok = b"\x01" + bytes(size - 1)

    def packed(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    cases = {
        "bytes": pack_mask(ok[:-4]),  # wrong length: one word short
        "more than": pack_mask(ok + bytes(4)),  # one word long
        "characters": pack_mask(ok) + "A" * 1000,  # too long to be a mask of this size
        "not base64": "!!not base64!!",
        "not zlib": packed(b"plain bytes here"),
        "trailing": packed(zlib.compress(ok) + b"junk"),
        "truncated": packed(zlib.compress(ok)[:-2]),
        "past vocab_size": pack_mask(ok[:-1] + b"\x80"),  # bit 127 of a 100-token vocabulary
        "no token": pack_mask(bytes(size)),
        "string": None,
    }
    for why, text in cases.items():
        with pytest.raises(ValueError, match=why):
            unpack_mask(text, vocab_size)
    bomb = pack_mask(b"\xff" * 10_000_000)  # ~13 KB of text for 10 MB
    with pytest.raises(ValueError):
        unpack_mask(bomb, 49152)
    small_bomb = pack_mask(b"\xff" * 1_000_000)  # short enough to reach the decompressor
    assert len(small_bomb) < 2 * mask_bytes(49152)
    with pytest.raises(ValueError, match="more than"):
        unpack_mask(small_bomb, 49152)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_mask_odd_vocab(dtype):
    vocab_size = 100  # not a multiple of 32: the last word is part padding
    rng = random.Random(1)
    keep = [rng.random() < 0.4 for _ in range(vocab_size)]
    mask = np.packbits(np.array(keep + [False] * 28, np.uint8), bitorder="little").tobytes()
    assert len(mask) == 16
    logits = torch.randn(vocab_size).to(dtype)
    original = logits.clone()
    apply_mask(logits, mask)
    keep_t = torch.tensor(keep)
    assert torch.equal(logits[keep_t], original[keep_t])
    assert torch.isneginf(logits[~keep_t]).all()
    with pytest.raises(ValueError, match="bytes"):
        apply_mask(torch.zeros(vocab_size + 32), mask)
