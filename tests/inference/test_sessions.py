"""Sessions in process, without a model: checking steps, opening, continuing, reserving and
closing their KV caches, and the prefix-cache guards."""

import pytest
import torch

from inference import CacheFullError, SessionError
from inference.batch import Step
from inference.kv_cache import FIRST_TOKENS, GROW_TOKENS
from inference.sessions import Sessions

HIDDEN, VOCAB = 8, 32


def make(max_tokens: int = 4 * GROW_TOKENS, span: tuple[int, int] = (0, 4)) -> Sessions:
    return Sessions(span, HIDDEN, VOCAB, max_tokens, idle_timeout_s=60, prefix_cache_tokens=0)


def ids(batch: int, steps: int) -> torch.Tensor:
    return torch.zeros(batch, steps, dtype=torch.long)


def test_check_returns_the_layers_and_refuses_bad_steps():
    sessions = make()
    assert sessions.check(Step("a", ids(1, 3), 0), set()) == (0, 4)
    assert sessions.check(Step("a", torch.zeros(1, 2, HIDDEN), 0, (2, 4)), set()) == (2, 4)
    with pytest.raises(ValueError, match=r"layers 2:6 are not inside this block's span 0:4"):
        sessions.check(Step("a", torch.zeros(1, 2, HIDDEN), 0, (2, 6)), set())
    with pytest.raises(ValueError, match=r"take token ids \[B, T\], got a tensor of shape \(1, 2, 8\)"):
        sessions.check(Step("a", torch.zeros(1, 2, HIDDEN), 0), set())
    with pytest.raises(ValueError, match=r"take hidden states \[B, T, 8\]"):
        sessions.check(Step("a", torch.zeros(1, 2, HIDDEN + 1), 0, (1, 4)), set())
    with pytest.raises(ValueError, match="at least one sequence and one position"):
        sessions.check(Step("a", ids(1, 0), 0), set())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 32\), got 0..32"):
        sessions.check(Step("a", torch.tensor([[0, VOCAB]]), 0), set())
    with pytest.raises(SessionError, match="session 'a' has two steps in one batch"):
        sessions.check(Step("a", ids(1, 1), 0), {"a"})


def test_a_step_opens_reserves_and_continues_its_session():
    sessions = make()
    session = sessions.session_for(Step("a", ids(1, 5), 0), (0, 4))
    assert len(sessions) == 1 and session.layers == (0, 4) and sessions.store.used_tokens == FIRST_TOKENS
    session.advance(5)
    assert sessions.session_for(Step("a", ids(1, 1), 5), (0, 4)) is session
    with pytest.raises(
        SessionError, match=r"session 'a' holds 5 positions of batch 1 for layers 0:4; the step"
    ):
        sessions.session_for(Step("a", ids(1, 1), 7), (0, 4))
    assert sessions.close("a") and len(sessions) == 0 and not sessions.close("a")


def test_one_shared_prompt_widens_to_n_sequences():
    sessions = make(max_tokens=8 * GROW_TOKENS)
    session = sessions.session_for(Step("a", ids(1, 4), 0), (0, 4))
    session.advance(4)
    assert sessions.session_for(Step("a", ids(3, 1), 4), (0, 4)).batch == 3


def test_a_refused_first_step_leaves_no_session_behind():
    sessions = make(max_tokens=GROW_TOKENS)
    with pytest.raises(CacheFullError):
        sessions.session_for(Step("big", ids(2, GROW_TOKENS), 0), (0, 4))
    assert "big" not in sessions.store and len(sessions) == 0


def test_new_sessions_of_one_sequence_lease_a_slot_of_the_pool():
    """The pool's positions come out of the budget; a session of one sequence keeps its keys and
    values in a slot (none of the budget), a wider one and one past the slots in buffers of its
    own; a stranger's slot still counts against its share; a second pool gives the first's back."""
    from types import SimpleNamespace

    from inference.kv_cache import Sender

    sessions = make(max_tokens=1024)
    config = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1)
    pool = sessions.enable_pool(config, torch.float32, torch.device("cpu"), slots=2, positions=128)
    assert sessions.store.max_tokens == 1024 - 256 and pool.kv[0][0].shape == (3, 1, 128, 4)
    a = sessions.session_for(Step("a", ids(1, 20), 0), (0, 4))
    wide = sessions.session_for(Step("w", ids(2, 2), 0), (0, 4))
    stranger = Sender("10.0.0.9")
    b = sessions.session_for(Step("b", ids(1, 4), 0, sender=stranger), (0, 4))
    c = sessions.session_for(Step("c", ids(1, 4), 0), (0, 4))
    assert (a.slot, b.slot, wide.slot, c.slot) == (0, 1, None, None) and pool.free == 0
    assert sessions.store.used_tokens == wide.batch * wide.capacity + c.capacity  # (slots hold none)
    assert sessions.store.held_by(stranger) == b.capacity > 0
    with pytest.raises(ValueError, match="takes the whole KV budget of 1024"):
        sessions.enable_pool(config, torch.float32, torch.device("cpu"), slots=8, positions=128)
    assert sessions.store.max_tokens == 1024 and sessions.pool is None


def test_sessions_opened_in_turn_lease_the_lowest_free_slots():
    """Slots go lowest first, also after sessions closed in any order: a batch of sessions opened
    in turn holds consecutive slots in its own order (a view of the pool, rows not reordered)."""
    from types import SimpleNamespace

    sessions = make(max_tokens=4096)
    config = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1)
    pool = sessions.enable_pool(config, torch.float32, torch.device("cpu"), slots=4, positions=64)
    first = [sessions.session_for(Step(f"a{i}", ids(1, 4), 0), (0, 4)).slot for i in range(4)]
    assert first == [0, 1, 2, 3] and pool.free == 0
    for i in (0, 1, 2, 3):  # closed first to last: a stack would hand out 3, 2, 1, 0 next
        sessions.close(f"a{i}")
    again = [sessions.session_for(Step(f"b{i}", ids(1, 4), 0), (0, 4)).slot for i in range(4)]
    assert again == [0, 1, 2, 3]


def test_prefix_guards():
    sessions = make()
    assert sessions.restore_prefix("a", (0, 4), (), 0, 40) == 0  # no prefix: nothing to restore
    assert sessions.restore_prefix("a", (0, 4), (1, 2), 0, 40) == 0  # nothing held
    with pytest.raises(
        SessionError, match=r"continues at 16 from a reused prefix; this peer holds 0 positions"
    ):
        sessions.restore_prefix("a", (0, 4), (1, 2), 16, 4)
    sessions.store_prefix("unknown", (1, 2))  # no such session: nothing kept
    assert len(sessions.prefixes) == 0 and sessions.expire() == []
