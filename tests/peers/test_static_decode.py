"""Real peers whose blocks decode through static KV slots (inference/cuda_graphs.py, run eagerly:
a CPU cannot capture) give the monolithic model's greedy text, with the scheduler's batching,
drafting, prefix reuse and n > 1 at work. The slots are few, so slotted and unslotted sessions
share forwards."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from transformers import AutoTokenizer

from tests.helpers import greedy_reference, monolithic
from tests.peers.processes import Swarm

STATIC = """
import inference.block, peers.node
from inference.cuda_graphs import GraphSettings
_load = inference.block.load_block
def _static(*args, **kwargs):
    block = _load(*args, **kwargs)
    settings = GraphSettings(batch_sizes=(1, 2, 4), positions=256, slots=4, shortest=16)
    block.enable_decode_graphs(settings, capture=False)
    return block
inference.block.load_block = peers.node.load_block = _static
"""
PROMPTS = ["hello swarm", "the quick brown fox", "0123456789", "abc", "LayerSwarm!", "zz top", "pipe", "x"]


@pytest.fixture(scope="module")
def static_swarm(tiny_llama, tmp_path_factory):
    swarm = Swarm(tiny_llama, tmp_path_factory.mktemp("logs"))
    try:
        for layers in ("0:1", "1:3", "3:4"):
            swarm.add(layers, patch=STATIC)
        swarm.wait_ready()
        for peer in swarm.peers:  # the tests use two of them as entries
            swarm.wait_route(peer)
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def greedy_text(tiny_llama):
    model, tok = monolithic(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    return lambda prompt, n: tok.decode(
        greedy_reference(model, tok.encode(prompt), n, eos=2), skip_special_tokens=True
    )


def complete(peer, prompt: str, max_tokens: int, **extra) -> list[str]:
    body = {"model": "llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    r = httpx.post(f"{peer.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


def test_concurrent_requests_through_static_slots_equal_monolithic(static_swarm, greedy_text):
    entry = static_swarm.peers[0]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: complete(entry, p * 3, 24)[0], PROMPTS))
    assert got == [greedy_text(p * 3, 24) for p in PROMPTS]
    for peer in static_swarm.peers:
        graphs = peer.health()["cuda_graphs"]
        assert graphs["enabled"] and not graphs["captured"] and graphs["steps"] > 0, graphs


def test_widened_prefixed_and_drafted_sessions_stay_exact(static_swarm, greedy_text):
    entry = static_swarm.peers[1]
    assert complete(entry, "the quick brown fox", 12, n=3) == [greedy_text("the quick brown fox", 12)] * 3
    system = "You are a helpful assistant of the LayerSwarm project. " * 2  # shared 32-token blocks
    for question in ("abc", "what is it?"):
        assert complete(entry, system + question, 16) == [greedy_text(system + question, 16)]
    copying = "one two three four five six seven eight " * 4  # prompt lookup drafts tokens
    assert complete(entry, copying, 40) == [greedy_text(copying, 40)]
    assert complete(entry, copying, 20, speculative=False) == [greedy_text(copying, 20)]


def test_the_cuda_graphs_flag_is_checked():
    from peers.cli import build_parser
    from peers.config import NodeConfig

    assert build_parser().parse_args(["serve", "--cuda-graphs", "off"]).cuda_graphs == "off"
    assert build_parser().parse_args(["serve"]).cuda_graphs == "auto"
    with pytest.raises(ValueError, match="cuda_graphs 'on' needs a CUDA device, got device 'cpu'"):
        NodeConfig(cuda_graphs="on")
    with pytest.raises(ValueError, match="cuda_graphs must be one of auto, on, off, got 'yes'"):
        NodeConfig(cuda_graphs="yes")
