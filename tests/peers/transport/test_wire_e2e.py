"""`peer serve --wire` on real peer processes of a tiny model: a hop is compressed only where the
next peer accepts it, a chain whose hops fall back to lossless stays exactly the monolithic
model, and int8 peers answer."""

import httpx
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from tests.helpers import greedy_reference, monolithic

PROMPTS = ["hello swarm", "the quick brown fox", "0123456789"]


def completion(peer, prompt: str, max_tokens: int = 24, ignore_eos: bool = False) -> dict:
    body = {"model": "llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    body["ignore_eos"] = ignore_eos
    r = httpx.post(f"{peer.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def frames_sent(peer) -> dict[str, float]:
    """Frames of hidden states the peer sent to its next hops, by encoding (GET /metrics)."""
    text = httpx.get(f"{peer.url}/metrics", timeout=10).text
    return {
        s.labels["encoding"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "layerswarm_wire_frames"
        for s in family.samples
        if s.name.endswith("_total")
    }


def start(make_swarm, model, wires: list[str]):
    swarm = make_swarm(model)
    for layers, wire in zip(("0:1", "1:3", "3:4"), wires, strict=True):
        swarm.add(layers, args=["--wire", wire])
    swarm.wait_ready()
    for peer in swarm.peers:  # each is an entry in a test below
        swarm.wait_route(peer)
    return swarm


def test_hops_to_lossless_peers_stay_lossless_and_exact(make_swarm, tiny_llama):
    """int8 -> lossless -> int8: the middle peer did not ask for int8, so no hop is compressed
    and greedy output equals the monolithic model's."""
    swarm = start(make_swarm, tiny_llama, ["int8", "lossless", "int8"])
    first, middle, last = swarm.peers
    announced = {row["address"]: row["wire"] for row in first.table()["peers"]}
    assert announced[middle.address] == ["lossless"]
    assert announced[last.address] == ["lossless", "bf16", "fp16", "int8"]
    model, tok = monolithic(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    for prompt in PROMPTS:
        ids = greedy_reference(model, tok.encode(prompt), 24, eos=2)
        expected = tok.decode(ids, skip_special_tokens=True)
        assert completion(first, prompt)["choices"][0]["text"] == expected
    for peer in (first, middle):
        sent = frames_sent(peer)
        assert sent["lossless"] > 0 and sent["int8"] == sent["bf16"] == sent["fp16"] == 0, sent


def test_int8_peers_answer_and_compress_only_where_accepted(make_swarm, tiny_llama):
    """int8 -> int8 -> lossless: the first hop of hidden states travels as int8, the second
    (to a lossless peer) as lossless; every request is answered in full."""
    swarm = start(make_swarm, tiny_llama, ["int8", "int8", "lossless"])
    first, middle, last = swarm.peers
    for entry in (first, last):  # (the last peer's requests start with token ids to the first)
        for prompt in PROMPTS:
            out = completion(entry, prompt, ignore_eos=True)
            assert out["usage"]["completion_tokens"] == 24 and out["choices"][0]["text"]
    sent = frames_sent(first)
    assert sent["int8"] > 0 and sent["lossless"] == 0, sent
    sent = frames_sent(middle)
    assert sent["lossless"] > 0 and sent["int8"] == 0, sent
