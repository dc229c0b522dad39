"""Fair KV admission in process: reservations grow with use, a sender not vouched for holds at
most its share, and a full cache makes room from the senders over theirs (inference/kv_cache.py)."""

import pytest
import torch

from inference import CacheFullError
from inference.batch import Step
from inference.kv_cache import (
    EVICT_IDLE_S,
    FIRST_TOKENS,
    GROW_TOKENS,
    OVER_SHARE_IDLE_S,
    STRANGER_SHARE,
    STRANGERS_SHARE,
    CacheStore,
    Sender,
    grown,
)
from inference.sessions import Sessions
from tests.helpers import FakeClock

BUDGET = 64 * FIRST_TOKENS
STRANGER, OTHER_STRANGER = Sender("host:127.0.0.2"), Sender("host:127.0.0.3")
PEER, OTHER_PEER = Sender("host:127.0.0.1", vouched=True), Sender("host:10.0.0.1", vouched=True)


def fill(store: CacheStore, sender: Sender, prefix: str, count: int | None = None) -> list[str]:
    """One-position sessions of `sender` (the attack's frames) until refused, or `count` of them."""
    opened = []
    while count is None or len(opened) < count:
        session = store.open(f"{prefix}{len(opened)}", 1, sender=sender)
        try:
            store.reserve(session, 1)
        except CacheFullError:
            store.close(session.session_id)
            if count is None:
                return opened
            raise
        opened.append(session.session_id)
    return opened


def test_a_reservation_grows_with_use_not_all_at_once():
    """A one-position step once reserved GROW_TOKENS (256) positions: now FIRST_TOKENS, doubling
    as the session uses them, then GROW_TOKENS at a time."""
    store = CacheStore(max_tokens=1 << 16, idle_timeout_s=60)
    session = store.open("s", 1)
    capacities = []
    for _ in range(1000):
        store.reserve(session, 1)
        session.advance(1)
        if not capacities or capacities[-1] != session.capacity:
            capacities.append(session.capacity)
    assert capacities == [16, 32, 64, 128, 256, 512, 768, 1024]
    assert grown(0, 1) == FIRST_TOKENS and grown(0, 100) == 112  # a prompt: what it needs, rounded
    assert grown(1024, 1025) == 1024 + GROW_TOKENS


def test_a_stranger_holds_at_most_its_share_and_the_peers_keep_the_rest():
    """The attack, in process: one-position sessions from a sender not vouched for stop at
    STRANGER_SHARE of the budget (before: 256 positions each, the whole budget); a vouched sender
    then finds the rest."""
    store = CacheStore(max_tokens=BUDGET, idle_timeout_s=120)
    opened = fill(store, STRANGER, "x")
    assert len(opened) == BUDGET * STRANGER_SHARE // FIRST_TOKENS
    assert store.held_by(STRANGER) == BUDGET * STRANGER_SHARE
    with pytest.raises(
        CacheFullError, match=r"its sender host:127.0.0.2 is not vouched for and holds 256, of"
    ):
        fill(store, STRANGER, "y", 1)
    assert len(fill(store, PEER, "p")) == BUDGET * (1 - STRANGER_SHARE) // FIRST_TOKENS


def test_strangers_together_hold_at_most_their_pool():
    store = CacheStore(max_tokens=BUDGET, idle_timeout_s=120)
    strangers = [Sender(f"host:10.9.0.{i}") for i in range(4)]
    held = [len(fill(store, s, f"{i}-")) * FIRST_TOKENS for i, s in enumerate(strangers)]
    assert held == [BUDGET * STRANGER_SHARE, BUDGET * STRANGER_SHARE, 0, 0]
    with pytest.raises(CacheFullError, match=r"senders not vouched for hold 512, of the 512 they may hold"):
        fill(store, strangers[3], "z", 1)
    assert sum(held) == BUDGET * STRANGERS_SHARE


def test_a_stranger_at_its_share_gives_up_its_own_idle_sessions_first():
    clock = FakeClock()
    store = CacheStore(max_tokens=BUDGET, idle_timeout_s=600, clock=clock)
    old = fill(store, STRANGER, "old")
    clock.now += EVICT_IDLE_S + 1
    assert fill(store, STRANGER, "new", 2) == ["new0", "new1"]
    assert old[0] not in store and old[1] not in store and old[2] in store


def test_a_vouched_sender_evicts_idle_strangers_before_anyone():
    """A full cache: a vouched sender's step evicts sessions of strangers idle OVER_SHARE_IDLE_S
    (not yet the EVICT_IDLE_S that anyone's idle sessions wait for), never active ones."""
    clock = FakeClock()
    store = CacheStore(max_tokens=BUDGET, idle_timeout_s=600, clock=clock)
    strangers = fill(store, STRANGER, "x")
    peers = fill(store, PEER, "p")
    assert store.used_tokens == BUDGET
    with pytest.raises(CacheFullError, match="held by active sessions"):
        fill(store, OTHER_PEER, "q", 1)  # every session is active
    clock.now += OVER_SHARE_IDLE_S
    store.get(strangers[0])  # a stranger's session that is still in use
    assert fill(store, OTHER_PEER, "q", 2) == ["q0", "q1"]
    assert strangers[0] in store and strangers[1] not in store and strangers[2] not in store
    assert all(p in store for p in peers)


def test_a_sender_under_its_fair_share_evicts_the_idle_sessions_of_one_over_it():
    """Vouched senders have no fixed cap: one alone may fill the cache, but when another needs
    room, the first one's sessions idle OVER_SHARE_IDLE_S go while it is over the fair share (the
    budget over the senders holding sessions); an active session is never taken."""
    clock = FakeClock()
    store = CacheStore(max_tokens=BUDGET, idle_timeout_s=600, clock=clock)
    first = fill(store, PEER, "a")
    assert store.held_by(PEER) == BUDGET  # alone, it uses the whole budget
    clock.now += OVER_SHARE_IDLE_S
    for sid in first[-8:]:
        store.get(sid)  # still in use
    assert len(fill(store, OTHER_PEER, "b")) == len(first) // 2  # up to the fair share
    assert store.held_by(PEER) == store.held_by(OTHER_PEER) == BUDGET // 2
    assert all(sid in store for sid in first[-8:])
    with pytest.raises(CacheFullError, match="held by active sessions"):
        fill(store, OTHER_PEER, "c", 1)  # at its fair share: it takes no more from the other


def test_a_stranger_never_takes_a_vouched_senders_sessions_before_they_idle_out():
    clock = FakeClock()
    store = CacheStore(max_tokens=BUDGET, idle_timeout_s=600, clock=clock)
    fill(store, PEER, "a")
    clock.now += OVER_SHARE_IDLE_S  # the peer is over its fair share, its sessions idle a while
    with pytest.raises(CacheFullError, match="held by active sessions"):
        fill(store, STRANGER, "x", 1)
    clock.now += EVICT_IDLE_S  # idle long enough for anyone's step to take
    assert fill(store, STRANGER, "x", 1) == ["x0"]


def test_a_step_opens_its_session_for_its_sender():
    sessions = Sessions((0, 4), 8, 32, BUDGET, idle_timeout_s=60)
    one = torch.zeros(1, 1, dtype=torch.long)
    for i in range(int(BUDGET * STRANGER_SHARE) // FIRST_TOKENS):
        assert sessions.session_for(Step(f"x{i}", one, 0, sender=STRANGER), (0, 4)).sender == STRANGER
    with pytest.raises(CacheFullError, match="not vouched for"):
        sessions.session_for(Step("late", one, 0, sender=STRANGER), (0, 4))
    assert "late" not in sessions.store  # a refused first step leaves no session behind
    assert sessions.session_for(Step("other", one, 0, sender=OTHER_STRANGER), (0, 4))
    assert sessions.session_for(Step("mine", one, 0), (0, 4)).sender.vouched  # this process's own
