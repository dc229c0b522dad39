"""An anonymous sender fills the KV cache (attack 6 of issue 23), against real peers on loopback:
strangers on other loopback hosts post thousands of one-position step frames to the last peer,
again and again, while users chat through the entry. Before fair admission each frame reserved
256 positions and the strangers pinned the whole budget: every chat got 429."""

import threading
from collections import Counter

import httpx
import pytest
import torch

from inference.kv_cache import FIRST_TOKENS, STRANGER_SHARE
from peers.transport.frames import PATH_STEPS, STEP_CONTENT_TYPE, Hop, Sampling, StepRequest, encode_steps
from tests.peers.processes import tiny_route

BUDGET = 4096  # token slots: sixteen frames of the old 256 positions each filled it
FRAMES = 2000  # one-position frames in each message of the attack
STRANGERS = ("127.0.0.2", "127.0.0.3")  # together they may hold every slot strangers may
PROMPTS = ("hello there", "the cache is", "one two three")


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    """Three peers of the tiny Llama (0:1, 1:3, 3:4) with a small KV budget."""
    with tiny_route(tiny_llama, tmp_path_factory.mktemp("logs"), ["--max-cache-tokens", str(BUDGET)]) as s:
        yield s


def completion(peer, prompt: str) -> httpx.Response:
    body = {"model": "llama", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{peer.url}/v1/completions", json=body, timeout=120)


def flood(last, host: str, stop: threading.Event, outcomes: Counter, rounds: list[int]) -> None:
    """Post FRAMES one-position frames for the last peer's layers from `host`, until `stop`; count
    each frame's outcome (ok, or the failure's type) and each message's status."""
    hop = Hop(last.peer_id, last.address, 3, 4)
    transport = httpx.HTTPTransport(local_address=host)
    with httpx.Client(transport=transport, timeout=120) as client:
        while not stop.is_set():
            n = len(rounds)
            reqs = [
                StepRequest(f"flood-{host}-{n}-{i}", 0, [hop], Sampling(temperature=0), torch.zeros(1, 1, 64))
                for i in range(FRAMES)
            ]
            r = client.post(
                f"http://{last.address}{PATH_STEPS}",
                content=encode_steps(reqs),
                headers={"content-type": STEP_CONTENT_TYPE},
            )
            rounds.append(r.status_code)
            if r.status_code == 200:
                for item in r.json()["results"]:
                    outcomes["ok" if "error" not in item else item["error"]["type"]] += 1


def test_strangers_flooding_the_last_peer_leave_room_for_the_swarms_chats(swarm):
    entry, last = swarm.peers[0], swarm.peers[2]
    expected = {p: completion(entry, p).json()["choices"][0]["text"] for p in PROMPTS}
    stop, outcomes, rounds = threading.Event(), {h: Counter() for h in STRANGERS}, []
    threads = [threading.Thread(target=flood, args=(last, h, stop, outcomes[h], rounds)) for h in STRANGERS]
    for t in threads:
        t.start()
    try:
        while len(rounds) < 2 * len(STRANGERS):  # (bounded: each message is answered or fails the test)
            assert all(t.is_alive() for t in threads), "a flooding thread died"
            threads[0].join(0.1)
        answers = [completion(entry, p) for p in PROMPTS for _ in range(2)]  # under the flood
        sessions = last.health()["sessions"]  # the strangers' (the chats closed theirs)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [r.status_code for r in answers] == [200] * len(answers), [r.text for r in answers]
    assert [r.json()["choices"][0]["text"] for r in answers] == [
        expected[p] for p in PROMPTS for _ in range(2)
    ]
    assert set(rounds) == {200}  # refused frames are answered as such, never a 500
    share = BUDGET * STRANGER_SHARE // FIRST_TOKENS  # one-position sessions a stranger may hold
    assert sessions <= len(STRANGERS) * share
    for host in STRANGERS:
        assert set(outcomes[host]) <= {"ok", "cache_full", "busy"}, outcomes[host]
        assert outcomes[host]["ok"] >= share and outcomes[host]["cache_full"] > 0, outcomes[host]
    assert last.health() is not None
