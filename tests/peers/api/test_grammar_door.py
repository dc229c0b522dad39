"""A json_schema the grammar engine cannot follow, at the OpenAI door of a peer of the tiny Llama
(in process, over httpx): a $ref loop is a 400 naming the $ref before anything is computed, and a
grammar that fails while generating ends the request with a 400 naming the grammar (an error
event once a stream has started). Never a 500, never the engine's internal state."""

import asyncio
import json

import httpx
import pytest

from peers.server import create_app
from tests.peers.test_inprocess import start_swarm, stop_swarm

LOOP = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}
# compiles and starts: but the tiny Llama's printable-ASCII vocabulary cannot write "é", and the
# engine fails at the string's first character
UNWRITABLE = {"const": "é"}
INTERNALS = ("<state>", "NoExtensionBias", "Parser", '"grammars"', "x-guidance", "internal error")


def chat(schema: dict, stream: bool) -> dict:
    fmt = {"type": "json_schema", "json_schema": {"name": "hostile", "schema": schema}}
    return {
        "model": "llama",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "temperature": 0,
        "response_format": fmt,
        "stream": stream,
    }


async def ask_door(model, bodies: list[dict]) -> list[httpx.Response]:
    _, (node,) = await start_swarm(model, ["0:4"])
    try:
        transport = httpx.ASGITransport(app=create_app(node), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://peer", timeout=60) as http:
            return [await http.post("/v1/chat/completions", json=body) for body in bodies]
    finally:
        await stop_swarm([node])


def error_events(r: httpx.Response) -> list[dict]:
    data = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    return [e["error"] for e in (json.loads(d) for d in data if d != "[DONE]") if "error" in e]


def assert_clean(message: str) -> None:
    for word in INTERNALS:
        assert word not in message, f"{word!r} in {message!r}"
    assert len(message) < 300, message


@pytest.fixture(scope="module")
def answers(tiny_llama) -> dict[tuple[str, bool], httpx.Response]:
    cases = [(name, stream) for name in ("loop", "unwritable") for stream in (False, True)]
    schemas = {"loop": LOOP, "unwritable": UNWRITABLE}
    responses = asyncio.run(ask_door(tiny_llama, [chat(schemas[n], s) for n, s in cases]))
    return dict(zip(cases, responses, strict=True))


@pytest.mark.parametrize("stream", [False, True])
def test_a_ref_loop_is_a_400_naming_the_ref(answers, stream):
    r = answers["loop", stream]
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format", error
    assert "$ref '#/$defs/a' loops back into itself" in error["message"], error
    assert_clean(error["message"])


def test_a_grammar_failing_mid_generation_is_a_400_naming_it(answers):
    r = answers["unwritable", False]
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("response_format", "grammar_failed"), error
    assert error["message"].startswith("response_format: the JSON schema "), error
    assert_clean(error["message"])


def test_a_grammar_failing_mid_stream_ends_it_with_an_error_naming_it(answers):
    r = answers["unwritable", True]
    assert r.status_code == 200, r.text  # its first token was sent before the grammar failed
    (error,) = error_events(r)
    assert (error["param"], error["code"]) == ("response_format", "grammar_failed"), error
    assert error["message"].startswith("response_format: the JSON schema "), error
    assert_clean(error["message"])
