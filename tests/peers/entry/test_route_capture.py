"""Route capture: a stranger announcing a long span wins routes by its length (one hop beats
several). In an open swarm such a hop is checked by the chain of shorter peers it shortcuts (a
second route, with this entry deciding a disagreement where no third route exists), so a lying
joiner is convicted instead of answering every checked user."""

import httpx

from tests.peers.processes import wait_until
from tests.peers.swarm.test_commitments import TAMPERED_WEIGHTS, complete, texts

PROMPTS = [f"capture {i}: {'klmnopqrst'[i % 10] * (1 + i % 3)}" for i in range(8)]


def test_a_full_span_joiner_is_checked_by_the_chain_it_shortcuts(tiny_llama, make_swarm):
    """An entry 0:1 (--verify-rate 1, --self-referee), a chain 1:2, 2:3, 3:4 and a lying joiner
    1:4 (tampered weights): unchecked requests take the joiner's one hop and get its text; every
    checked request equals the monolithic model's, and the joiner is convicted."""
    expected = texts(tiny_llama, PROMPTS, 8)
    s = make_swarm(tiny_llama)
    entry = s.add("0:1", args=["--verify-rate", "1", "--self-referee"])
    chain = [s.add("1:2"), s.add("2:3"), s.add("3:4")]
    joiner = s.add("1:4", patch=TAMPERED_WEIGHTS)
    s.wait_ready()
    size = len(s.peers)
    serving = lambda p: sum(r["vouched"] and r["status"] == "serving" for r in p.table()["peers"])  # noqa: E731
    wait_until(lambda: serving(entry) == size and serving(chain[-1]) == size, 60, s._why)

    unchecked = [complete(chain[-1], p, 8) for p in PROMPTS]  # its verify rate is 0 on loopback
    assert sum(u != e for u, e in zip(unchecked, expected, strict=True)) > 0  # the joiner captured them

    assert [complete(entry, p, 8) for p in PROMPTS] == expected
    stats = entry.health()["verification"]
    assert set(stats["convicted"]) == {joiner.peer_id}, stats
    assert stats["requests"] == len(PROMPTS), stats


def test_layers_only_one_peer_serves_are_reported_unchecked(tiny_llama, make_swarm):
    """0:1 and 3:4 have one peer each, 1:3 two: /health names the spans no check can cover, and
    each response says which of its route's layers were beyond any other peer's check."""
    s = make_swarm(tiny_llama)
    entry = s.add("0:1")
    s.add("1:3")
    s.add("1:3")
    s.add("3:4")
    s.wait_ready()
    s.wait_route(entry)
    wait_until(lambda: entry.health()["verification"]["unchecked_layers"] == [[0, 1], [3, 4]], 60, s._why)
    body = {"model": "llama", "prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0}
    r = httpx.post(f"{entry.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["x-layerswarm-unchecked-layers"] == "0:1,3:4", r.headers
    with httpx.stream("POST", f"{entry.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.headers["x-layerswarm-unchecked-layers"] == "0:1,3:4"
        r.read()


def test_a_lone_liar_is_checked_by_the_entry_itself(tiny_llama, make_swarm):
    """An entry 0:1 (--verify-rate 1, --self-referee), a lying 1:3 (tampered weights) that no other
    peer serves, and a last 3:4: unchecked, users get the liar's text; checked, the entry
    recomputes layers 0:3 itself, convicts the liar, and answers no text rather than a wrong one
    (no other peer serves 1:3)."""
    expected = texts(tiny_llama, PROMPTS[:4], 8)
    s = make_swarm(tiny_llama)
    entry = s.add("0:1", args=["--verify-rate", "1", "--self-referee"])
    liar = s.add("1:3", patch=TAMPERED_WEIGHTS)
    last = s.add("3:4")
    s.wait_ready()
    s.wait_route(entry)
    s.wait_route(last)
    unchecked = [complete(last, p, 8) for p in PROMPTS[:4]]
    assert sum(u != e for u, e in zip(unchecked, expected, strict=True)) > 0  # the attack works unchecked
    body = {"model": "llama", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{entry.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 503, r.text  # no route left without the liar: no text, never a wrong one
    assert set(entry.health()["verification"]["convicted"]) == {liar.peer_id}
