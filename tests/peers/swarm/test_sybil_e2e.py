"""A sybil flood against real peers (attack 1 of issue 23): a stranger on another loopback host
pushes 1,020 entries signed with keys of its own to every peer every second. Chats through every
peer keep giving the monolithic text, nobody is declared dead, and a newcomer started during the
flood is vouched for and serves within 30 s (before, one such push took the swarm down)."""

import threading
import time

import httpx
import pytest
from transformers import AutoTokenizer

from peers.swarm.gossip import PATH_GOSSIP
from peers.swarm.identity import Identity
from peers.swarm.membership import MAX_UNVOUCHED_ENTRIES, PeerRecord
from tests.helpers import greedy_reference, monolithic
from tests.peers.processes import tiny_route, wait_until

FLOOD_ENTRIES = 1020  # under the message cap: parsed and merged, not refused whole
POOL = 4096  # identities the stranger signs with, a window of them each second
ATTACKER_HOST = "127.0.0.2"
PROMPTS = ["hello swarm", "under attack", "abc"]


class Flood(threading.Thread):
    """Every second, the same message of FLOOD_ENTRIES freshly signed entries to every address
    `targets()` names, from ATTACKER_HOST; `answers` counts the status codes."""

    def __init__(self, targets):
        super().__init__(daemon=True)
        self.targets, self.stop = targets, threading.Event()
        self.answers: dict[int, int] = {}
        self.pool = [Identity.generate() for _ in range(POOL)]

    def message(self, tick: int) -> dict:
        start = tick * FLOOD_ENTRIES // 2  # half of each window is new, half re-signed
        entries = []
        for i in range(FLOOD_ENTRIES):
            identity = self.pool[(start + i) % POOL]
            entry = PeerRecord(
                "", "llama", 4, 0, 4, "serving", 1, tick + 1, 0, address=f"127.0.0.3:{20000 + i}"
            )
            entries.append(entry.signed(identity).to_json())
        return {"entries": entries, "challenge": "c" * 24}

    def run(self) -> None:
        transport = httpx.HTTPTransport(local_address=ATTACKER_HOST)
        with httpx.Client(transport=transport, timeout=10) as client:
            tick = 0
            while not self.stop.is_set():
                began = time.monotonic()
                body = self.message(tick)
                for address in self.targets():
                    try:
                        status = client.post(f"http://{address}{PATH_GOSSIP}", json=body).status_code
                    except httpx.HTTPError:
                        status = 0
                    self.answers[status] = self.answers.get(status, 0) + 1
                tick += 1
                self.stop.wait(max(0.0, 1.0 - (time.monotonic() - began)))


@pytest.fixture(scope="module")
def greedy_chat(tiny_llama):
    model, tok = monolithic(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)

    def text(content: str, max_tokens: int) -> str:
        ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return tok.decode(greedy_reference(model, ids, max_tokens, eos=2), skip_special_tokens=True)

    return text


def chat(peer, content: str, max_tokens: int = 12) -> httpx.Response:
    body = {
        "model": "llama",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return httpx.post(f"{peer.url}/v1/chat/completions", json=body, timeout=60)


def assert_chats_equal_monolithic(peers, greedy_chat) -> None:
    for peer in peers:
        for prompt in PROMPTS:
            r = chat(peer, prompt)
            assert r.status_code == 200, (peer.address, r.text)
            assert r.json()["choices"][0]["message"]["content"] == greedy_chat(prompt, 12), peer.address


def vouched_by_all(peers, newcomer) -> bool:
    return all(
        any(row["peer_id"] == newcomer.peer_id and row["vouched"] for row in p.table()["peers"])
        for p in peers
    )


def test_a_sybil_flood_takes_nothing_down_and_a_newcomer_joins_during_it(tiny_llama, tmp_path, greedy_chat):
    with tiny_route(tiny_llama, tmp_path) as swarm:
        honest = list(swarm.peers)
        flood = Flood(lambda: [p.address for p in swarm.peers])
        flood.start()
        try:
            wait_until(lambda: flood.answers.get(200, 0) >= 3 * len(honest), 60, swarm._why)
            assert_chats_equal_monolithic(honest, greedy_chat)

            newcomer = swarm.add("1:3")
            swarm.wait_ready([newcomer])
            ready = time.monotonic()
            wait_until(lambda: vouched_by_all(honest, newcomer), 30, swarm._why)
            wait_until(lambda: not newcomer.table()["gaps"], 30 - (time.monotonic() - ready), swarm._why)
            print(
                f"newcomer vouched for by all and routed {time.monotonic() - ready:.1f} s after it was ready"
            )
            assert_chats_equal_monolithic(swarm.peers, greedy_chat)
            # (the flood goes on until it has been delivered enough, however fast the rest went)
            wait_until(lambda: flood.answers.get(200, 0) >= 10 * len(honest), 60, swarm._why)
            assert_chats_equal_monolithic(swarm.peers, greedy_chat)
        finally:
            flood.stop.set()
            flood.join(30)
        assert flood.answers.get(200, 0) >= 10 * len(honest), flood.answers  # the flood was delivered
        live = {p.peer_id: p.health()["incarnation"] for p in swarm.peers}
        for peer in swarm.peers:
            table = peer.table()
            assert not [d for d in table["declared_dead"] if live.get(d[0]) == d[1]], peer.address
            rows = {row["peer_id"]: row for row in table["peers"]}
            assert set(live) <= set(rows), peer.address
            assert all(rows[p]["status"] == "serving" and rows[p]["vouched"] for p in live), peer.address
            assert sum(not row["vouched"] for row in table["peers"]) <= MAX_UNVOUCHED_ENTRIES, peer.address
