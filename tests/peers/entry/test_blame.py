"""Blame needs evidence (issue 23, attack 2): a route member that reports "my next hop failed" at
every step gets itself avoided, not the honest peer it names; a next hop that answers garbage
does not get the honest peer before it banned. Real peer processes on loopback."""

import re

import httpx
import pytest

from tests.helpers import greedy_reference, monolithic
from tests.peers.processes import wait_until

# a 1:3 replica whose hop computes its part, then says its next hop refused the connection
LIES_ABOUT_ITS_NEXT_HOP = """
import peers.transport.forwarder as f
from peers.transport.errors import HopFailed
async def lying(self, req):
    raise HopFailed(req.hops[0].peer_id, "ConnectError: All connection attempts failed")
f.Forwarder.push = lying
"""

# a 2:4 replica that answers every step frame it is sent with a reply that does not parse
ANSWERS_GARBAGE = """
import peers.swarm_routes as r
async def garbage(self, req, sender):
    return {"tokens": "garbage"}
r.SwarmRoutes.run = garbage
"""

PROMPTS = [f"request {i}: {'klmnopqrst'[i] * (1 + i % 3)}" for i in range(10)]
N_TOKENS = 6


def monolithic_texts(model_path, prompts: list[str], n_tokens: int) -> list[str]:
    from transformers import AutoTokenizer

    model, tok = monolithic(model_path), AutoTokenizer.from_pretrained(model_path)
    return [
        tok.decode(greedy_reference(model, tok.encode(p), n_tokens, eos=2), skip_special_tokens=True)
        for p in prompts
    ]


@pytest.mark.parametrize("entry_args", [[], ["--no-direct-return"]], ids=["direct", "nested"])
def test_a_peer_blaming_its_honest_next_hop_is_the_one_banned(tiny_llama, make_swarm, entry_args):
    """An honest entry 0:1, an honest and a lying replica of 1:3, and the only 3:4: 10 greedy
    requests all answer the monolithic model's text; the liar's claims are checked (3:4
    answers), so the liar is banned and 3:4 never is."""
    s = make_swarm(tiny_llama, ["--failover-timeout", "5"])
    entry = s.add("0:1", args=entry_args)
    s.add("1:3")
    liar = s.add("1:3", patch=LIES_ABOUT_ITS_NEXT_HOP)
    last = s.add("3:4")
    s.wait_ready()
    serving = lambda p: sum(r["vouched"] and r["status"] == "serving" for r in p.table()["peers"])  # noqa: E731
    wait_until(lambda: serving(entry) == len(s.peers), 60, s._why)
    expected = monolithic_texts(tiny_llama, PROMPTS, N_TOKENS)
    got = []
    for prompt in PROMPTS:
        body = {"model": "llama", "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}
        r = httpx.post(f"{entry.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got.append(r.json()["choices"][0]["text"])
    assert got == expected
    lines = entry.log_path.read_text(errors="replace").splitlines()
    liar_id, last_id = liar.peer_id, last.peer_id
    assert any(f"peer {liar_id} banned for" in line for line in lines), "\n".join(lines[-40:])
    # (the entry's ban lines: "peer X banned for", or "peer X failed: why ...; banned for")
    banned_last = [
        line for line in lines if re.search(f"peer {last_id} (banned for|failed: .*banned for)", line)
    ]
    assert not banned_last
    assert last.alive() and (last.health() or {}).get("steps_served", 0) > 0


def banned_lines(lines: list[str], peer_id: str) -> list[str]:
    """The entry's log lines that ban `peer_id` (see the test above)."""
    return [line for line in lines if re.search(f"peer {peer_id} (banned for|failed: .*banned for)", line)]


@pytest.mark.parametrize("entry_args", [[], ["--no-direct-return"]], ids=["direct", "nested"])
def test_a_next_hop_answering_garbage_gets_nobody_honest_banned(tiny_llama, make_swarm, entry_args):
    """An honest entry 0:1, the only 1:2, a 2:4 replica that answers garbage and an honest 2:4:
    the honest 1:2 reports its next hop's wrong answer (alive: a liveness check would have banned
    1:2 itself). Every request answers the monolithic model's text, 1:2 is never banned, and
    the liar is avoided."""
    s = make_swarm(tiny_llama, ["--failover-timeout", "5"])
    entry = s.add("0:1", args=entry_args)
    middle = s.add("1:2")
    liar = s.add("2:4", patch=ANSWERS_GARBAGE)
    s.add("2:4")
    s.wait_ready()
    serving = lambda p: sum(r["vouched"] and r["status"] == "serving" for r in p.table()["peers"])  # noqa: E731
    wait_until(lambda: serving(entry) == len(s.peers), 60, s._why)
    expected = monolithic_texts(tiny_llama, PROMPTS, N_TOKENS)
    got = []
    for prompt in PROMPTS:
        body = {"model": "llama", "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}
        r = httpx.post(f"{entry.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got.append(r.json()["choices"][0]["text"])
    assert got == expected
    lines = entry.log_path.read_text(errors="replace").splitlines()
    assert not banned_lines(lines, middle.peer_id), "\n".join(lines[-40:])
    claims = entry.health()["claims"]
    # one wrong answer: every route after it went around the liar (and kept the only 1:2)
    assert claims["wrong_answers"] == 1 and claims["refuted"] == 0, claims
    assert liar.peer_id in claims["suspected"], claims
    assert middle.alive() and (middle.health() or {}).get("steps_served", 0) > 0
