"""Two real peers of the tiny Llama, the second with `--quant int8`: the swarm answers what the
same blocks answer in one process, and /health shows each peer's weights_bytes."""

import httpx
import pytest
from transformers import AutoTokenizer

from inference import LocalChain, generate, load_block, weights_bytes
from peers.config import NodeConfig


def test_node_config_refuses_an_unknown_quant():
    with pytest.raises(ValueError, match="fp3"):
        NodeConfig(quant="fp3")


def test_int8_peer_serves_and_reports_its_smaller_weights(tiny_llama, make_swarm):
    swarm = make_swarm(tiny_llama)
    first = swarm.add("0:2")
    second = swarm.add("2:4", args=["--quant", "int8"])
    swarm.wait_ready()
    swarm.wait_route(first)

    r = httpx.post(
        f"{first.url}/v1/completions",
        json={"model": "llama", "prompt": "hello swarm", "max_tokens": 16, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    chain = LocalChain([load_block(tiny_llama, "0:2"), load_block(tiny_llama, "2:4", quant="int8")])
    tokens = list(generate(chain, tok.encode("hello swarm"), 16, eos_token_ids=frozenset({2})))
    assert r.json()["choices"][0]["text"] == tok.decode(tokens, skip_special_tokens=True)

    health = {peer: peer.health() for peer in (first, second)}
    assert health[first]["quant"] == "none" and health[second]["quant"] == "int8"
    assert health[first]["weights_bytes"] == weights_bytes(load_block(tiny_llama, "0:2"))
    float_share = weights_bytes(load_block(tiny_llama, "2:4"))
    assert health[second]["weights_bytes"] <= 0.35 * float_share
    assert health[second]["weights_bytes"] < health[first]["weights_bytes"]
