"""Sampling defaults per model (--generation-config, as vLLM's): a request that names no
temperature, top_p, top_k, min_p or repetition_penalty gets the model's own (its
generation_config.json, else a built-in model's card: SmolLM2's 0.2 and 0.9); one that names
them keeps its own; `--generation-config none` keeps OpenAI's. GET /v1/models/{id} shows them."""

import asyncio
import json
import shutil

import httpx
import pytest
from transformers import AutoTokenizer

from inference.models import sampling_defaults
from peers.server import create_app
from tests.helpers import greedy_reference, monolithic
from tests.peers.test_inprocess import start_swarm, stop_swarm


def test_the_model_says_first_then_a_builtin_card_then_nothing(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True, "eos_token_id": 2})
    )
    assert sampling_defaults("any", tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert sampling_defaults("smollm2-135m", tmp_path) == {"temperature": 0.2, "top_p": 0.9}
    assert sampling_defaults("any", tmp_path) == {}
    assert sampling_defaults("any", tmp_path / "missing") == {}


@pytest.fixture(scope="module")
def greedy_by_default(tiny_llama, tmp_path_factory):
    """The tiny Llama whose generation_config asks for greedy decoding (temperature 0)."""
    path = tmp_path_factory.mktemp("gc") / "llama"
    shutil.copytree(tiny_llama, path)
    config = (
        json.loads((path / "generation_config.json").read_text())
        if (path / "generation_config.json").exists()
        else {}
    )
    (path / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    return path


async def ask(model, mode: str, calls: list[tuple[str, str, dict | None]]) -> list[httpx.Response]:
    _, (node,) = await start_swarm(model, ["0:4"], settings={0: {"generation_config": mode}})
    try:
        transport = httpx.ASGITransport(app=create_app(node), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://peer", timeout=60) as http:
            return [await http.request(m, url, json=body) for m, url, body in calls]
    finally:
        await stop_swarm([node])


def test_a_request_naming_no_sampling_gets_the_models(greedy_by_default):
    tok = AutoTokenizer.from_pretrained(greedy_by_default)
    want = tok.decode(
        greedy_reference(monolithic(greedy_by_default), tok.encode("hello"), 8), skip_special_tokens=True
    )
    bare = {"model": "llama", "prompt": "hello", "max_tokens": 8, "ignore_eos": True}
    hot = {**bare, "temperature": 1.5, "seed": 3}
    calls = [("GET", "/v1/models/llama", None)] + [("POST", "/v1/completions", b) for b in (bare, bare, hot)]
    card, first, second, own = asyncio.run(ask(greedy_by_default, "auto", calls))
    assert card.json()["sampling_defaults"] == {"temperature": 0.0}
    texts = [r.json()["choices"][0]["text"] for r in (first, second, own)]
    assert texts[0] == texts[1] == want  # greedy, as the model asks
    assert texts[2] != want  # the request's own temperature wins
    card, first = asyncio.run(ask(greedy_by_default, "none", calls[:2]))
    assert card.json()["sampling_defaults"] == {}
    assert first.json()["choices"][0]["text"] != want  # OpenAI's temperature 1.0
