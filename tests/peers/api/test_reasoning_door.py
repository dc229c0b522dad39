"""A thinking chat template at the OpenAI door of a peer of the default model (in process, over
httpx): a Qwen3-like template whose generation prompt opens `<think>`, so that the text before
`</think>` is reasoning_content and the rest content, streamed or not, exactly as the raw
completion of the same prompt splits; chat_template_kwargs {"enable_thinking": false} closes the
thinking in the prompt, and all is content; the template's variables are checked; a grammar
inside the thinking is refused; a model that does not think answers as before."""

import asyncio
import json

import httpx
import pytest

from peers.server import create_app
from tests.peers.test_inprocess import start_swarm, stop_swarm

pytestmark = pytest.mark.slow

QWEN3_LIKE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}"
)
# a few earlier turns that think, so that the small model thinks, closes </think> and answers
SHOTS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid")]
MESSAGES = [
    m
    for country, city in SHOTS
    for m in (
        {"role": "user", "content": f"What is the capital of {country}?"},
        {"role": "assistant", "content": f"<think>\nThe user asks for a capital. Easy.\n</think>\n\n{city}"},
    )
] + [{"role": "user", "content": "What is the capital of Germany?"}]
CITY = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "schema": {
            "type": "object",
            "properties": {"city": {"enum": ["Berlin", "Paris"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
OFF = {"chat_template_kwargs": {"enable_thinking": False}}


def streamed(r: httpx.Response) -> tuple[str, str, str | None]:
    """(reasoning, content, finish_reason) of a chat stream."""
    assert r.status_code == 200, r.text
    reasoning = content = ""
    finish = None
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            choice = json.loads(line[6:])["choices"][0]
            reasoning += choice["delta"].get("reasoning_content", "")
            content += choice["delta"].get("content", "")
            finish = choice["finish_reason"] or finish
    return reasoning, content, finish


async def ask_door(model) -> dict:
    """Every request of this module, against one peer with the template and one without."""
    out = {}
    _, (node,) = await start_swarm(model, ["0:30"], settings={0: {"chat_template": QWEN3_LIKE}})
    try:
        transport = httpx.ASGITransport(app=create_app(node))
        async with httpx.AsyncClient(transport=transport, base_url="http://peer", timeout=120) as http:

            async def chat(**body):
                base = {"model": node.served_model, "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
                return await http.post("/v1/chat/completions", json={**base, **body})

            async def raw(template_kwargs: dict) -> str:
                ids = node.tokenizer.encode_chat(MESSAGES, template_kwargs=template_kwargs)
                body = {"model": node.served_model, "prompt": ids, "max_tokens": 24, "temperature": 0}
                out["tail", bool(template_kwargs)] = node.tokenizer.decode(ids[-12:])
                return (await http.post("/v1/completions", json=body)).json()["choices"][0]["text"]

            out["raw"], out["raw off"] = await raw({}), await raw({"enable_thinking": False})
            out["whole"], out["stream"] = await chat(), await chat(stream=True)
            out["whole off"], out["stream off"] = await chat(**OFF), await chat(**OFF, stream=True)
            out["grammar"] = await chat(response_format=CITY, max_tokens=40)
            out["grammar off"] = await chat(response_format=CITY, max_tokens=40, **OFF)
            out["clash"] = await chat(chat_template_kwargs={"messages": [], "tools": []})
            out["unread"] = await chat(chat_template_kwargs={"enable_thinking": True, "bogus": 1})
            out["not an object"] = await chat(chat_template_kwargs=["enable_thinking"])
            out["effort"] = await chat(reasoning_effort="low")
    finally:
        await stop_swarm([node])
    _, (plain,) = await start_swarm(model, ["0:30"])
    try:
        transport = httpx.ASGITransport(app=create_app(plain))
        async with httpx.AsyncClient(transport=transport, base_url="http://peer", timeout=120) as http:
            body = {"model": plain.served_model, "messages": MESSAGES[-1:], "max_tokens": 4, "temperature": 0}
            out["plain"] = await http.post("/v1/chat/completions", json=body)
    finally:
        await stop_swarm([plain])
    return out


@pytest.fixture(scope="module")
def answers(default_model) -> dict:
    return asyncio.run(ask_door(default_model))


def test_thinking_comes_apart_from_the_answer(answers):
    raw = answers["raw"]
    assert "</think>" in raw, raw  # the model thinks, closes the thought and answers
    thought, _, answer = raw.partition("</think>")
    r = answers["whole"]
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] == thought and message["content"] == answer.lstrip()
    assert message["content"] and "<think>" not in message["content"]
    assert streamed(answers["stream"]) == (thought, answer.lstrip(), r.json()["choices"][0]["finish_reason"])


def test_enable_thinking_false_makes_it_all_content(answers):
    assert answers["tail", True].endswith("<think>\n\n</think>\n\n")
    r = answers["whole off"]
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["content"] == answers["raw off"] and message["reasoning_content"] is None
    reasoning, content, _ = streamed(answers["stream off"])
    assert (reasoning, content) == ("", answers["raw off"])


def test_a_grammar_inside_the_thinking_is_refused_and_applies_once_it_is_off(answers):
    r = answers["grammar"]
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert "enable_thinking" in r.json()["error"]["message"]
    r = answers["grammar off"]
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert json.loads(message["content"])["city"] in ("Berlin", "Paris")
    assert message["reasoning_content"] is None


@pytest.mark.parametrize(
    "case, param, says",
    [
        ("clash", "chat_template_kwargs", "messages, tools may not be set here"),
        ("unread", "chat_template_kwargs", "does not read bogus"),
        ("not an object", "chat_template_kwargs", "dictionary"),
        ("effort", "reasoning_effort", "does not read reasoning_effort"),
    ],
)
def test_template_variables_are_checked(answers, case, param, says):
    r = answers[case]
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_a_model_that_does_not_think_answers_as_before(answers):
    r = answers["plain"]
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert set(message) == {"role", "content"} and message["content"]
