"""The session cache store: budget, reservations that grow with use, LRU eviction, idle expiry,
close (the fair share of each sender: test_kv_fairness.py)."""

import pytest
import torch

from inference import CacheFullError, RequestTooLarge, SessionError, load_block
from inference.kv_cache import EVICT_IDLE_S, FIRST_TOKENS, GROW_TOKENS, CacheStore
from tests.helpers import FakeClock


def test_budget_counts_batch_times_allocated_positions():
    store = CacheStore(max_tokens=4 * GROW_TOKENS, idle_timeout_s=60)
    a = store.open("a", batch=2)
    store.reserve(a, 10)
    assert store.used_tokens == 2 * FIRST_TOKENS


def test_least_recently_used_session_is_evicted_for_a_new_one():
    clock = FakeClock()
    store = CacheStore(max_tokens=2 * FIRST_TOKENS, idle_timeout_s=60, clock=clock)
    for sid in ("a", "b"):
        store.reserve(store.open(sid, batch=1), 10)
        clock.now += 1
    store.get("a")  # a is now the most recently used
    with pytest.raises(CacheFullError, match="held by active sessions"):
        store.reserve(store.open("c", batch=1), 10)  # a and b are active: nothing is evicted
    assert "a" in store and "b" in store
    clock.now += EVICT_IDLE_S + 1  # both idle now
    store.get("a")
    store.reserve(store.open("c", batch=1), 10)
    assert "b" not in store and "a" in store and "c" in store
    with pytest.raises(SessionError, match="unknown session 'b'"):
        store.get("b")


def test_session_over_the_budget_gets_a_clear_error():
    store = CacheStore(max_tokens=100, idle_timeout_s=60)
    session = store.open("big", batch=2)
    with pytest.raises(
        CacheFullError, match=r"needs 120 KV token slots \(batch 2 x 60 positions\); the cache budget is 100"
    ):
        store.reserve(session, 60)


def test_one_session_may_hold_at_most_half_the_budget():
    """A session of batch 256 once held a peer's whole cache: now at most half of it, so that
    one request cannot take the cache from everyone else."""
    store = CacheStore(max_tokens=4 * GROW_TOKENS, idle_timeout_s=60)
    big = store.open("big", batch=64)
    with pytest.raises(RequestTooLarge, match=r"at most 512 \(50% of the cache budget of 1024\)"):
        store.reserve(big, 9)  # 576 slots
    store.reserve(big, 8)  # 512: exactly half
    assert store.used_tokens == 512
    other = store.open("other", batch=1)
    store.reserve(other, 500)  # the other half stays for others (500 positions round up to 512)
    assert store.used_tokens == 1024


def test_idle_sessions_expire_and_close_frees():
    clock = FakeClock()
    store = CacheStore(max_tokens=10_000, idle_timeout_s=5, clock=clock)
    store.open("old", batch=1)
    clock.now = 3
    store.open("new", batch=1)
    clock.now = 6
    assert store.expire() == ["old"]
    assert store.close("new") and len(store) == 0


def test_block_over_budget_raises_and_stays_usable(tiny_llama):
    block = load_block(tiny_llama, "0:4", max_cache_tokens=16)
    with pytest.raises(CacheFullError, match="the cache budget is 16"):
        block("s", torch.zeros(1, 20, dtype=torch.long), 0)
    assert block.open_sessions() == 0  # no empty session left behind
    logits = block("t", torch.zeros(1, 8, dtype=torch.long), 0)
    assert logits.shape == (1, 1, 256)


def test_cache_grows_past_its_first_allocation(tiny_llama):
    block = load_block(tiny_llama, "0:4")
    ids = torch.arange(GROW_TOKENS + 10).remainder(256)[None]
    whole = block("whole", ids, 0, last_only=False)
    block("steps", ids[:, : GROW_TOKENS - 2], 0)
    for pos in range(GROW_TOKENS - 2, GROW_TOKENS + 10):
        last = block("steps", ids[:, pos : pos + 1], pos)
    assert torch.allclose(last[:, -1], whole[:, -1], atol=1e-4)


def test_a_session_with_a_queued_step_is_not_evicted():
    clock = FakeClock()
    store = CacheStore(max_tokens=2 * FIRST_TOKENS, idle_timeout_s=600, clock=clock)
    for sid in ("a", "b"):
        store.reserve(store.open(sid, batch=1), 10)
    clock.now += EVICT_IDLE_S + 1
    store.touch("a")  # a step of a waits in a queue
    store.reserve(store.open("c", batch=1), 10)
    assert "a" in store and "b" not in store


def test_prefix_cache_evicts_a_chains_tail_before_its_head():
    from inference.prefix_cache import BLOCK_TOKENS, PrefixCache

    class Fake:
        def read(self, layer, row, end):
            t = torch.zeros(1, 1, end, 2)
            return t, t

    cache = PrefixCache(max_tokens=4 * BLOCK_TOKENS)
    cache.store(Fake(), (0, 1), (1, 2, 3))
    cache.store(Fake(), (0, 1), (7, 8, 9))  # room for 4 blocks: two of the first chain go
    assert cache.match((0, 1), (1, 2, 3)) == 1  # its head survived, not its tail
    assert cache.match((0, 1), (7, 8, 9)) == 3
