"""Captured decode steps (inference/cuda_graphs.py) over static KV slots (inference/kv_slots.py).

On a CPU the static step runs without capture: its bookkeeping (slots, padding, length
buckets, chunks, sessions leaving their slots) and its outputs are checked against the varlen
forward, fp32. The tests marked for CUDA capture real graphs and run only where CUDA is.
"""

import gc

import pytest
import torch

from inference import load_block
from inference.batch import Step
from inference.cuda_graphs import GraphSettings, length_bucket, padded_batch
from inference.kv_cache import SessionCache
from inference.kv_slots import SlotPool
from tests.helpers import greedy_reference, monolithic

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPTS = [[5, 17, 99, 42, 7, 3, 250, 64, 12, 8, 77], [9, 9, 1, 200, 31], [44] * 3, list(range(3, 40))]
SMALL = GraphSettings(batch_sizes=(1, 4), positions=512, slots=6, shortest=8)
MORE = [[7, 8], [100, 3, 3, 90], [12] * 20]  # with PROMPTS: 7 sessions for 6 slots


def test_padded_batch_and_length_buckets():
    sizes = (1, 2, 4, 8, 16)
    assert [padded_batch(n, sizes) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert [length_bucket(n, 256, 2048) for n in (1, 256, 257, 1000, 2048)] == [256, 256, 512, 1024, 2048]
    assert length_bucket(300, 256, 300) == 300  # never past the slot
    with pytest.raises(AssertionError):
        padded_batch(17, sizes)


@pytest.mark.parametrize(
    "kwargs", [dict(batch_sizes=()), dict(batch_sizes=(2, 1)), dict(batch_sizes=(0, 1)), dict(slots=0)]
)
def test_settings_name_the_bad_value(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GraphSettings(**kwargs)


def test_settings_within_a_budget():
    assert GraphSettings.within(65536, 8192) == GraphSettings(positions=2048, slots=16)
    assert GraphSettings.within(1000, 512) == GraphSettings(positions=500, slots=1)
    assert GraphSettings.within(4096, 512) == GraphSettings(positions=512, slots=4)


def _pool(slots=2, positions=8) -> SlotPool:
    return SlotPool(range(3, 5), slots, positions, 2, 4, torch.float32, torch.device("cpu"))


def test_slots_are_leased_once_and_come_back():
    pool = _pool()
    a, b = pool.lease(), pool.lease()
    assert {a.slot, b.slot} == {0, 1} and pool.lease() is None
    a.release()
    a.release()  # idempotent: the slot is free once, not twice
    assert pool.free == 1
    assert pool.lease().slot == a.slot and pool.lease() is None
    assert pool.scratch == 2 and pool.kv[3][0].shape == (3, 2, 8, 4)


def test_a_bound_session_writes_into_its_slot():
    pool = _pool()
    session = SessionCache("s", 1)
    lease = pool.lease()
    session.bind(lease, pool.views(lease.slot), pool.positions)
    session.grow_to(8)
    key = torch.randn(1, 2, 3, 4)
    session.write(3, 0, 0, key, -key)
    assert torch.equal(pool.kv[3][0][lease.slot, :, :3], key[0])
    assert torch.equal(session.read(3, 0, 3)[1], -key)


def test_a_session_leaves_its_slot_when_it_outgrows_it_or_widens():
    pool = _pool(positions=8)
    grown, widened = SessionCache("a", 1), SessionCache("b", 1)
    for session in (grown, widened):
        lease = pool.lease()
        session.bind(lease, pool.views(lease.slot), pool.positions)
        session.grow_to(4)
        session.write(3, 0, 0, torch.ones(1, 2, 4, 4), torch.ones(1, 2, 4, 4))
        session.advance(4)
    grown.grow_to(16)
    widened.widen(3)
    assert grown.slot is None and widened.slot is None and pool.free == 2
    assert grown.read(3, 0, 4)[0].sum() == 32 and grown.capacity == 16
    assert widened.read(3, 2, 4)[0].sum() == 32
    pool.kv[3][0].zero_()  # the slots are another session's now: the copies stand alone
    assert grown.read(3, 0, 4)[0].sum() == 32


def test_the_slot_pool_comes_out_of_the_kv_budget(tiny_llama):
    """KV memory stays within --max-cache-tokens: the pool's positions leave the store's budget,
    and a session in a slot holds none of what is left."""
    block = load_block(tiny_llama, "0:2", max_cache_tokens=8192)
    block.enable_decode_graphs(SMALL, capture=False)
    assert block.sessions.max_tokens == 8192 - SMALL.slots * SMALL.positions
    block.enable_decode_graphs(SMALL, capture=False)  # again: the old pool's share came back
    assert block.sessions.max_tokens == 8192 - SMALL.slots * SMALL.positions
    block.forward("s", torch.tensor([[1, 2, 3]]), 0)
    assert block.sessions.get("s").slot is not None and block.sessions.used_tokens == 0
    block.forward("s", torch.zeros(1, SMALL.positions, dtype=torch.long), 3)  # outgrows its slot
    session = block.sessions.get("s")
    assert session.slot is None and block.sessions.used_tokens == session.capacity >= SMALL.positions + 3
    with pytest.raises(ValueError, match="whole KV budget"):
        load_block(tiny_llama, "0:2", max_cache_tokens=3072).enable_decode_graphs(SMALL, capture=False)


def test_a_dropped_session_gives_its_slot_back(tiny_llama):
    block = load_block(tiny_llama, "0:2")
    block.enable_decode_graphs(SMALL, capture=False)
    block.forward("s", torch.tensor([[1, 2, 3]]), 0)
    assert block.graphs.pool.free == SMALL.slots - 1
    block.close("s")
    gc.collect()
    assert block.graphs.pool.free == SMALL.slots


def test_graphs_need_cuda_where_asked_for(tiny_llama):
    assert load_block(tiny_llama, "0:2").graphs is None  # off by default on a CPU
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        load_block(tiny_llama, "0:2", cuda_graphs=True)


def _decode_all(blocks, prompts, max_new, draft_every=0):
    """Greedy tokens and every block's outputs, all sessions stepped together; with
    draft_every, every so often session 0 sends a step of 3 positions (prefill-like) beside the
    others' decode steps, so one forward mixes the two."""
    state = {i: (0, p) for i, p in enumerate(prompts)}
    tokens = {i: [] for i in range(len(prompts))}
    outputs = []
    for tick in range(max_new):
        steps = []
        for i in range(len(prompts)):
            position, ids = state[i]
            if draft_every and i == 0 and tick % draft_every == draft_every - 1:
                ids = ids + ids + ids  # three positions: the varlen path
            steps.append(Step(f"s{i}", torch.tensor([ids]), position))
        x = steps
        for block in blocks:
            outs = block.forward_batch(x)
            assert not any(isinstance(o, Exception) for o in outs), outs
            outputs.append([o.clone() for o in outs])
            x = [Step(s.session_id, o, s.position) for s, o in zip(x, outs, strict=True)]
        for i, (s, step) in enumerate(zip(steps, x, strict=True)):
            token = int(step.inputs[0, -1].argmax())
            tokens[i].append(token)
            state[i] = (s.position + s.inputs.shape[1], [token])
    return tokens, outputs


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_static_decode_equals_the_varlen_forward(tiny_models, kind):
    """Chunks and padding (6 or 5 slotted decode steps as 4 + 2 padded to 4, or 4 + 1), length
    buckets (8 to 64), more sessions than slots, a sliding window (mistral), and decode steps
    beside a longer step in one forward."""
    path = tiny_models[kind]
    spans = ("0:1", "1:3", "3:4")
    plain = [load_block(path, span) for span in spans]
    static = [load_block(path, span) for span in spans]
    for block in static:
        assert block.enable_decode_graphs(SMALL, capture=False)
    want_tokens, want = _decode_all(plain, PROMPTS + MORE, 24, draft_every=7)
    got_tokens, got = _decode_all(static, PROMPTS + MORE, 24, draft_every=7)
    assert got_tokens == want_tokens
    for step_got, step_want in zip(got, want, strict=True):
        for a, b in zip(step_got, step_want, strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-5), (a - b).abs().max()
    for block in static:
        assert block.graphs.steps > 0 and block.graphs.pool.free == 0


def test_static_decode_equals_monolithic_generate(tiny_llama):
    model = monolithic(tiny_llama)
    blocks = [load_block(tiny_llama, span) for span in ("0:2", "2:4")]
    for block in blocks:
        block.enable_decode_graphs(SMALL, capture=False)
    tokens, _ = _decode_all(blocks, PROMPTS[:2], 24)
    assert [tokens[0], tokens[1]] == [greedy_reference(model, p, 24) for p in PROMPTS[:2]]


def test_a_session_past_its_slot_goes_on_eagerly(tiny_llama):
    settings = GraphSettings(batch_sizes=(1, 2), positions=256, slots=2, shortest=64)
    plain, static = load_block(tiny_llama), load_block(tiny_llama)
    static.enable_decode_graphs(settings, capture=False)
    prompt = [(i * 7) % 250 + 3 for i in range(250)]
    want, _ = _decode_all([plain], [prompt], 12)
    got, _ = _decode_all([static], [prompt], 12)
    assert got == want
    session = static.sessions.find("s0")
    assert session.slot is None and session.length == 261 and static.graphs.pool.free == 2
    assert static.graphs.steps == 6  # positions 250..255 ran static; 256.. need more than the slot


def test_rewound_drafts_and_widened_sessions_stay_exact(tiny_llama):
    """A drafted step's rejected positions are rewritten by the next static step; a session of
    one prompt widened to n sequences leaves its slot and runs varlen."""
    plain, static = load_block(tiny_llama), load_block(tiny_llama)
    static.enable_decode_graphs(SMALL, capture=False)
    for block in (plain, static):
        block.forward("d", torch.tensor([PROMPTS[0]]), 0)
        block.forward_batch([Step("d", torch.tensor([[4, 5, 6]]), 11, drafted=True)])
    outs = [b.forward("d", torch.tensor([[9]]), 12) for b in (plain, static)]  # keeps 1 of the drafts
    assert torch.allclose(*outs, atol=1e-4)
    outs = [b.forward("d", torch.tensor([[3]]), 13) for b in (plain, static)]
    assert torch.allclose(*outs, atol=1e-4)
    for block in (plain, static):
        block.forward("w", torch.tensor([PROMPTS[1]]), 0)
    outs = [b.forward("w", torch.tensor([[1], [2], [3]]), 5) for b in (plain, static)]
    assert torch.allclose(*outs, atol=1e-4) and static.sessions.find("w").slot is None


@needs_cuda
def test_captured_graphs_equal_the_varlen_forward_on_cuda(tiny_models):
    path = tiny_models["mistral"]
    spans = ("0:1", "1:3", "3:4")
    plain = [load_block(path, span, device="cuda", dtype="float32", cuda_graphs=False) for span in spans]
    captured = [load_block(path, span, device="cuda", dtype="float32") for span in spans]
    assert all(b.graphs is not None and b.graphs.capture for b in captured)
    want_tokens, want = _decode_all(plain, PROMPTS + MORE, 24, draft_every=7)
    got_tokens, got = _decode_all(captured, PROMPTS + MORE, 24, draft_every=7)
    assert got_tokens == want_tokens
    for step_got, step_want in zip(got, want, strict=True):
        for a, b in zip(step_got, step_want, strict=True):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    for block in captured:
        assert block.graphs.enabled and block.graphs.replays > 0
