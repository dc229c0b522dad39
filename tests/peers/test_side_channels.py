"""No cross-user side channel through the prefix cache (attack 5 of issue 23), with three real
peers on loopback, two API keys and a metrics key: user B, guessing the PIN in user A's prompt
through the same entry, can tell the right guess neither from /health, nor from /metrics (it
needs the metrics key), nor by a cache hit; A's own prefixes are still reused."""

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from inference.prefix_cache import BLOCK_TOKENS
from tests.helpers import greedy_reference, monolithic
from tests.peers.processes import Peer, tiny_route

KEY_A, KEY_B, METRICS_KEY = "sk-user-a-0123", "sk-user-b-4567", "metrics-key-89ab"
ARGS = ["--api-key", KEY_A, "--api-key", KEY_B, "--metrics-key", METRICS_KEY]
SECRET = "4821"
GUESSES = ["1111", "2222", "3333", "4444", "5555", SECRET, "6666", "7777", "8888", "9999", "0000"]
FILLER = " and the quick brown fox jumps over the lazy dog, twice or more"  # 2 full blocks in all


def prompt(pin: str) -> str:
    return f"My PIN is {pin}{FILLER}"  # (a byte-level tokenizer: the PIN is in the first block)


@pytest.fixture(scope="module")
def keyed(tiny_llama, tmp_path_factory):
    """Peers 0:1, 1:3 and 3:4 taking API keys A and B, /metrics behind the metrics key."""
    with tiny_route(tiny_llama, tmp_path_factory.mktemp("logs"), ARGS) as swarm:
        yield swarm


def complete(entry: Peer, key: str, text: str, max_tokens: int = 4) -> str:
    body = {"model": "llama", "prompt": text, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(
        f"{entry.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def prefix_samples(text: str) -> dict[str, float]:
    families = text_string_to_metric_families(text)
    return {s.name: s.value for family in families for s in family.samples if "prefix" in s.name}


def hit_positions(peer: Peer) -> float:
    """The peer's prefix-cache hits, read with the metrics key."""
    r = httpx.get(f"{peer.url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=10)
    assert r.status_code == 200, r.text
    return prefix_samples(r.text)["layerswarm_prefix_hit_positions_total"]


def counted(value, words=("prefix", "hit", "miss")) -> dict:
    """The fields of a JSON value (at any depth) whose names hold one of `words`, by path."""
    found = {}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        if isinstance(key, str) and any(w in key for w in words):
            found[key] = inner
        found.update({f"{key}.{k}": v for k, v in counted(inner, words).items()})
    return found


def seen_by_anyone(peers: list[Peer]) -> list:
    """What a caller without the metrics key reads of the prefix cache: /health's prefix_cache
    section (and any other field naming hits or misses), and /metrics' prefix samples if it
    answers."""
    seen = []
    for peer in peers:
        fields = counted(httpx.get(f"{peer.url}/health", timeout=10).json())
        metrics = httpx.get(f"{peer.url}/metrics", timeout=10)
        scraped = prefix_samples(metrics.text) if metrics.status_code == 200 else {}
        seen.append((fields, metrics.status_code, scraped))
    return seen


def test_b_cannot_tell_the_pin_in_as_prompt(keyed):
    entry, peers = keyed.peers[0], keyed.peers
    said = complete(entry, KEY_A, prompt(SECRET))
    changes, gains = [], []
    for guess in GUESSES:
        before, hits = seen_by_anyone(peers), [hit_positions(p) for p in peers]
        complete(entry, KEY_B, prompt(guess))
        changes.append((before, seen_by_anyone(peers)))
        gains.append([hit_positions(p) - h for p, h in zip(peers, hits, strict=True)])
    right = GUESSES.index(SECRET)
    for (before, after), guess in zip(changes, GUESSES, strict=True):
        assert before == after, (guess, before, after)  # nothing open moves with a guess
        assert [status for _, status, _ in after] == [401] * len(peers)  # /metrics needs the key
    assert gains == [[0] * len(peers)] * len(GUESSES), (gains, right)  # not even the right guess hits
    hits = [hit_positions(p) for p in peers]
    assert complete(entry, KEY_A, prompt(SECRET)) == said
    blocks = len(prompt(SECRET)) // BLOCK_TOKENS
    assert all(hit_positions(p) - h >= blocks * BLOCK_TOKENS for p, h in zip(peers, hits, strict=True))


def test_the_swarm_page_and_table_show_no_prefix_counters(keyed):
    entry = keyed.peers[0]
    complete(entry, KEY_A, prompt(SECRET))
    complete(entry, KEY_A, prompt(SECRET))  # a hit on every peer
    for path in ("/view", "/swarm/table", "/health"):
        r = httpx.get(f"{entry.url}{path}", timeout=30)
        assert r.status_code == 200, (path, r.text)
        assert counted(r.json(), ("hit", "miss")) == {}, (path, r.text)


def test_requests_sharing_a_prefix_reuse_its_kv(keyed, tiny_llama):
    """Within a partition (one API key), a shared system prompt is restored on every peer, and the
    text is the monolithic model's."""
    model, tok = monolithic(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    entry = keyed.peers[2]
    system = "You are a helpful assistant of the LayerSwarm project. " * 2  # > 3 blocks of 32 tokens
    hits = [hit_positions(p) for p in keyed.peers]
    for question in ("what is a swarm?", "who serves layer 2?"):
        ids = tok.encode(system + question)
        expected = tok.decode(greedy_reference(model, ids, 10, eos=2), skip_special_tokens=True)
        assert complete(entry, KEY_A, system + question, 10) == expected
    after = [hit_positions(p) for p in keyed.peers]
    assert all(a >= h + 96 for h, a in zip(hits, after, strict=True)), (hits, after)
