"""The store of kept responses (peers/api/response_store.py), without a model: bounded in count
(the oldest goes first) and in age (a fake clock), delete, and its bounds checked."""

import pytest

from peers.api.response_store import MAX_STORED_RESPONSES, STORED_RESPONSE_TTL_S, ResponseStore


class Clock:
    def __init__(self):
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_the_defaults_are_a_thousand_responses_for_an_hour():
    assert (MAX_STORED_RESPONSES, STORED_RESPONSE_TTL_S) == (1000, 3600.0)
    store = ResponseStore()
    assert (store.max_responses, store.ttl_s) == (1000, 3600.0)


def test_the_oldest_goes_first_when_full():
    store = ResponseStore(max_responses=3, ttl_s=60, clock=Clock())
    for k in range(5):
        store.put(f"resp_{k}", {"id": f"resp_{k}"}, [k])
    assert len(store) == 3
    assert store.get("resp_0") is None and store.get("resp_1") is None
    kept = store.get("resp_4")
    assert kept.body == {"id": "resp_4"} and kept.items == (4,)


def test_a_response_expires_after_the_ttl():
    clock = Clock()
    store = ResponseStore(max_responses=10, ttl_s=60, clock=clock)
    store.put("resp_a", {}, [])
    clock.now_s = 30
    store.put("resp_b", {}, [])
    clock.now_s = 59.9
    assert store.get("resp_a") is not None
    clock.now_s = 60
    assert store.get("resp_a") is None and store.get("resp_b") is not None
    clock.now_s = 90
    assert store.get("resp_b") is None and len(store) == 0


def test_delete_forgets_and_says_whether_it_was_kept():
    store = ResponseStore(clock=Clock())
    store.put("resp_a", {}, [])
    assert store.delete("resp_a") is True
    assert store.delete("resp_a") is False and store.get("resp_a") is None


@pytest.mark.parametrize(("count", "ttl_s"), [(0, 60), (10, 0)])
def test_a_store_without_room_or_time_is_refused(count, ttl_s):
    with pytest.raises(ValueError, match="at least one response"):
        ResponseStore(max_responses=count, ttl_s=ttl_s)
