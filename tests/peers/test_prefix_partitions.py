"""The prefix cache partitioned by requester, in process: prefix hashes are salted per requester
(API key, else host), the door runs each request as its requester, /metrics needs --metrics-key
where one is set and shows the prefix counters only then, and one tiny peer lends a prompt's KV
to its sender again but never to another host."""

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference.prefix_cache import BLOCK_TOKENS
from peers.config import NodeConfig
from peers.entry.prefix import prefix_hashes
from peers.server import create_app
from peers.transport.auth import LOCAL, Guard, requester
from tests.peers.test_inprocess import start_swarm, stop_swarm

KEY_A, KEY_B, METRICS_KEY = "sk-user-a-0123", "sk-user-b-4567", "metrics-key-89ab"
PROMPT = "PIN 4821: " + "the quick brown fox jumps over the lazy dog. " * 2  # 3 blocks, the PIN in the first


def test_the_same_tokens_hash_apart_for_two_requesters():
    ids = list(range(3, 3 + 3 * BLOCK_TOKENS + 5))
    a, b = prefix_hashes(ids, "key:a"), prefix_hashes(ids, "key:b")
    assert len(a) == len(b) == 3
    assert not set(a) & set(b)  # no block of one is a block of the other
    assert prefix_hashes(ids, "key:a") == a  # a requester's own prefixes still match
    assert prefix_hashes(ids) == prefix_hashes(ids, LOCAL) and requester() == LOCAL  # outside a request
    assert prefix_hashes(ids[:-5] + [1, 2, 3, 4, 5], "key:a") == a  # only full blocks count


def guarded(api_keys=(), metrics=None) -> tuple[list[str], Guard]:
    """A Guard over an app that notes the requester each request runs as."""
    seen: list[str] = []

    async def app(scope, receive, send):
        seen.append(requester())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return seen, Guard(app, None, api_keys, metrics=metrics)


def client(app, host: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(host, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://peer", timeout=60)


def test_the_door_runs_each_request_as_its_api_key_else_its_host():
    async def main():
        seen, guard = guarded((KEY_A, KEY_B))
        http = client(guard)
        for key in (KEY_A, KEY_B, KEY_A):
            r = await http.post("/v1/completions", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        assert (await http.get("/health")).status_code == 200
        assert seen[0] == seen[2] != seen[1] and seen[0].startswith("key:") and KEY_A not in seen[0]
        assert seen[3] == "host:127.0.0.1"  # outside /v1/: its host
        seen, guard = guarded()
        for host in ("10.0.0.1", "10.0.0.2"):
            async with client(guard, host) as other:
                await other.post("/v1/completions", headers={"Authorization": f"Bearer {KEY_A}"})
        assert seen == ["host:10.0.0.1", "host:10.0.0.2"]  # no API keys: a key sent is no partition
        assert requester() == LOCAL  # (each request's requester ends with it)

    asyncio.run(main())


def test_metrics_need_the_metrics_key_where_one_is_set():
    async def main():
        http = client(guarded(metrics=("/metrics", METRICS_KEY))[1])
        for headers in ({}, {"Authorization": "Bearer wrong-key-0000"}, {"Authorization": METRICS_KEY}):
            r = await http.get("/metrics", headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "invalid_metrics_key"
            assert "metrics key" in r.json()["error"]["message"]
        assert (
            await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
        ).status_code == 200
        assert (await http.get("/health")).status_code == 200  # the rest stays open
        assert (
            await client(guarded()[1]).get("/metrics")
        ).status_code == 200  # without a key: open, as before

    asyncio.run(main())


def test_a_short_metrics_key_is_refused():
    with pytest.raises(ValueError, match="metrics_key must be at least 8 printable characters"):
        NodeConfig(metrics_key="short")


def prefix_samples(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "prefix" in s.name
    }


def test_a_peer_lends_a_prompts_kv_to_its_sender_only(tiny_llama):
    """Host A's prompt again: its blocks are restored; the same prompt from host B: nothing is.
    /health never shows the counters, nor does /metrics without a metrics key."""
    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}

    async def main():
        _, (node,) = await start_swarm(tiny_llama, ["0:4"])
        app = create_app(node)
        try:
            async with client(app, "127.0.0.1") as a, client(app, "127.0.0.2") as b:
                texts, hits = [], []
                for who in (a, a, b, b, a):
                    r = await who.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    texts.append(r.json()["choices"][0]["text"])
                    hits.append(node.block.prefixes.hits)
                health, metrics = (await a.get("/health")).json(), (await a.get("/metrics")).text
        finally:
            await stop_swarm([node])
        return texts, hits, health, metrics

    texts, hits, health, metrics = asyncio.run(main())
    assert len(set(texts)) == 1, texts
    blocks = len(PROMPT) // BLOCK_TOKENS  # (a byte-level tokenizer; the last position is computed)
    assert hits == [
        0,
        blocks * BLOCK_TOKENS,
        blocks * BLOCK_TOKENS,
        2 * blocks * BLOCK_TOKENS,
        3 * blocks * BLOCK_TOKENS,
    ]
    assert "hit" not in str(health) and "miss" not in str(health)
    assert prefix_samples(metrics) == {}


def test_the_metrics_key_shows_the_prefix_counters(tiny_llama):
    async def main():
        _, (node,) = await start_swarm(tiny_llama, ["0:4"], settings={0: {"metrics_key": METRICS_KEY}})
        node.block.prefixes.hits, node.block.prefixes.misses = 64, 32
        try:
            async with client(create_app(node)) as http:
                refused = await http.get("/metrics")
                shown = await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
        finally:
            await stop_swarm([node])
        return refused, shown

    refused, shown = asyncio.run(main())
    assert refused.status_code == 401
    assert prefix_samples(shown.text) == {
        "layerswarm_prefix_cache_blocks": 0,
        "layerswarm_prefix_hit_positions_total": 64,
        "layerswarm_prefix_miss_positions_total": 32,
    }
