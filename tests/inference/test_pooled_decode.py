"""Decode rows of sessions that hold slots of a block's KV pool are written with one indexed store
and attended in one call per layer (inference/batch.py Pooled): what they give equals the same
rows run one by one (fp32, CPU), with rows of different lengths, sliding windows, attention sinks,
slots out of order and not consecutive, sessions without a slot and prefill rows in the same
forward, and a session that outgrows its slot."""

import pytest
import torch

from inference import load_block
from inference.batch import Pooled, Step

PROMPTS = [
    [5, 17, 99, 42, 7, 3, 250, 64, 12, 8, 77],
    [9, 9, 1, 200, 31],
    [44] * 3,
    list(range(3, 40)),
    [8, 1],
]


def drive(block, script):
    """Run `script` (ticks of (session, prompt ids, or None: its last token, or "close"))
    through `block`; returns every step's output."""
    state, outputs = {}, []
    for tick in script:
        steps = []
        for sid, ids in tick:
            if ids == "close":
                block.close(sid)
            elif ids is None:
                position, token = state[sid]
                steps.append(Step(sid, torch.tensor([[token]]), position))
            else:
                steps.append(Step(sid, torch.tensor([ids]), 0))
        outs = block.forward_batch(steps)
        assert not any(isinstance(o, Exception) for o in outs), outs
        for step, out in zip(steps, outs, strict=True):
            state[step.session_id] = (step.position + step.inputs.shape[1], int(out[0, -1].argmax()))
            outputs.append(out.clone())
    return outputs


def script():
    """Five sessions for three slots: s0-s2 take slots 0-2, s3 and s4 keep buffers of their own;
    s1 stops at tick 6 and s5 opens (its prefill beside decode rows) and takes slot 1, its rows
    first: slots 1, 0, 2 in row order; every ninth tick s5 sits out (slots 0 and 2: not
    consecutive). s0 and s2 outgrow their 48-position slots (at 32 positions they would grow to
    64) and leave them."""
    ticks = [[(f"s{i}", p) for i, p in enumerate(PROMPTS)]]
    for t in range(1, 44):
        tick = [("s0", None), ("s2", None), ("s3", None), ("s4", None)]
        if t < 6:
            tick.insert(1, ("s1", None))
        elif t == 6:
            tick += [("s1", "close"), ("s5", PROMPTS[1] + [3, 4])]
        else:
            tick.insert(0, ("s5", None))
        if t % 9 == 0:
            tick = [row for row in tick if row[0] != "s5"]
        ticks.append(tick)
    return ticks


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt_oss", "gemma3_text"])
def test_pooled_rows_equal_the_rows_one_by_one(family_model, tiny_models, kind, monkeypatch):
    path = tiny_models[kind] if kind in tiny_models else family_model(kind)
    pooled, plain = load_block(path), load_block(path)
    assert pooled.kv.pool is not None  # (a CPU block keeps a pool by default)
    plain.kv.pool = None  # every session in buffers of its own: rows attend one by one
    pooled.kv.enable_pool(pooled.config, pooled.dtype, pooled.device, slots=3, positions=48)
    used = []
    make = Pooled.of
    monkeypatch.setattr(Pooled, "of", lambda *a: used.append(make(*a)) or used[-1])
    want, got = drive(plain, script()), drive(pooled, script())
    for a, b in zip(got, want, strict=True):  # (float32 sums in another order: ~1e-5 of hidden states ~4)
        assert a.shape == b.shape and torch.allclose(a, b, atol=5e-5, rtol=1e-5), (a - b).abs().max()
    groups = [p for p in used if p is not None]
    assert any(p.view is None for p in groups) and any(p.view is not None for p in groups)
    assert any(
        mask is not None for p in groups for _, mask, _ in p.masks.values()
    )  # rows of different lengths
    if kind != "llama":  # (sliding windows of 6: rows spread wider than that gather their own window)
        assert any(at is not None for p in groups for *_, at in p.masks.values())
    assert pooled.sessions.find("s0").slot is None  # it outgrew its slot and left it


def test_rows_of_different_lengths_pool_while_their_masked_keys_cost_less_than_the_calls():
    """Rows whose lengths differ attend in one pooled call while the masked keys and values they
    would read cost less than the attention calls saved (CALL_BYTES each); past that, one by one."""
    from types import SimpleNamespace

    from inference.batch import CALL_BYTES, Segment
    from inference.kv_slots import SlotPool

    def pool(kv_heads: int) -> SlotPool:
        return SlotPool(range(1), 8, 4096, kv_heads, 64, torch.float32, torch.device("cpu"))

    def rows(p: SlotPool, lengths: list[int]) -> list[Segment]:
        caches = [SimpleNamespace(lease=SimpleNamespace(pool=p), slot=i) for i in range(len(lengths))]
        return [Segment(c, 0, i, 1, n - 1) for i, (c, n) in enumerate(zip(caches, lengths, strict=True))]

    mixed = [16, 29, 43, 57, 70, 84, 98, 112]  # 44% of the longest's keys masked
    small, wide = pool(4), pool(64)
    assert small.position_bytes * (112 * 8 - sum(mixed)) <= 7 * CALL_BYTES
    assert Pooled.of(rows(small, mixed), small, {0: None}) is not None
    assert Pooled.of(rows(wide, mixed), wide, {0: None}) is None  # (64 KV heads: 17x the bytes)
    assert Pooled.of(rows(wide, [100, 90, 110, 105]), wide, {0: None}) is not None  # (under 25% masked)
