"""Fields of other servers at the OpenAI door of a peer of the tiny Llama (in process, over httpx):
vLLM's return_token_ids (the prompt's ids and the generated ones, the monolithic model's greedy
tokens, whole and streamed) and structured_outputs (json, regex, choice, grammar, json_object),
llama.cpp's GBNF grammar, and the fields of messages (an assistant's earlier reasoning_content
reaches the chat template); what is not implemented is a 400 naming it."""

import asyncio
import json
import re

import httpx
import pytest
from transformers import AutoTokenizer

from peers.server import create_app
from tests.helpers import greedy_reference, monolithic
from tests.peers.test_inprocess import start_swarm, stop_swarm

# reads an assistant's earlier thought, as Qwen3's template does
TEMPLATE = (
    "{% for m in messages %}{% if m.reasoning_content %}<{{ m.reasoning_content }}>{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }};{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
HI = [{"role": "user", "content": "hi"}]
SAID = [*HI, {"role": "assistant", "content": "yes", "reasoning_content": "think"}, *HI]
GREEDY = {"model": "llama", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}},
    "required": ["n"],
    "additionalProperties": False,
}
GBNF = 'root ::= ("red" | "green") " " [0-9]'
STRUCTURED = {  # name: (path, fields, what the text fully matches)
    "choice": ("/v1/chat/completions", {"structured_outputs": {"choice": ["yes", "no"]}}, r"yes|no"),
    "regex": (
        "/v1/completions",
        {"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
        r"[0-9]{3}-[a-z]{2}",
    ),
    "grammar": ("/v1/chat/completions", {"structured_outputs": {"grammar": GBNF}}, r"(red|green) [0-9]"),
    "llama.cpp": ("/v1/completions", {"grammar": GBNF}, r"(red|green) [0-9]"),
    "json": (
        "/v1/chat/completions",
        {"structured_outputs": {"json": json.dumps(SCHEMA)}},
        r'\{"n": -?[0-9]+\}',
    ),
    "json_object": ("/v1/completions", {"structured_outputs": {"json_object": True}}, r"\{.*\}"),
}
REFUSED = {  # name: (path, fields, the 400's param)
    "structural_tag": (
        "/v1/chat/completions",
        {"structured_outputs": {"structural_tag": "{}"}},
        "structured_outputs.structural_tag",
    ),
    "bad regex": ("/v1/completions", {"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
    "two at once": ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, None),
    "and response_format": (
        "/v1/chat/completions",
        {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
        "structured_outputs",
    ),
    "bad gbnf": ("/v1/completions", {"grammar": "root ::= nowhere"}, "grammar"),
    "both grammars": ("/v1/completions", {"grammar": GBNF, "structured_outputs": {"regex": "a"}}, "grammar"),
    "and ignore_eos": (
        "/v1/completions",
        {"structured_outputs": {"regex": "a"}, "ignore_eos": True},
        "ignore_eos",
    ),
    "guided_json": ("/v1/chat/completions", {"guided_json": SCHEMA}, "guided_json"),
    "thought of a user": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x", "reasoning_content": "y"}]},
        "messages.0",
    ),
    "user's tool_call_id": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x", "tool_call_id": "c1"}]},
        "messages.0",
    ),
    "unknown message field": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x", "refusal": "no"}]},
        "messages.0.refusal",
    ),
}


def body(path: str, **fields) -> dict:
    prompt = {"messages": HI} if path == "/v1/chat/completions" else {"prompt": "hello"}
    return {**GREEDY, **prompt, **fields}


def chunks(r: httpx.Response) -> list[dict]:
    data = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"]


async def door(model, calls: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    _, (node,) = await start_swarm(model, ["0:4"], settings={0: {"chat_template": TEMPLATE}})
    try:
        transport = httpx.ASGITransport(app=create_app(node), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://peer", timeout=60) as http:
            return [await http.request(method, path, json=b) for method, path, b in calls]
    finally:
        await stop_swarm([node])


@pytest.fixture(scope="module")
def answers(tiny_llama) -> dict[str, httpx.Response]:
    chat, text = "/v1/chat/completions", "/v1/completions"
    calls = {
        "chat": ("POST", chat, body(chat)),
        "chat streamed": ("POST", chat, body(chat, stream=True)),
        "text": ("POST", text, body(text)),
        "text streamed": ("POST", text, body(text, stream=True)),
        "two prompts": ("POST", text, body(text, prompt=["hello", "hi there"])),
        "tokenize chat": ("POST", "/tokenize", {"messages": HI}),
        "tokenize text": ("POST", "/tokenize", {"prompt": "hello"}),
        "said": ("POST", chat, body(chat, messages=SAID, max_tokens=1)),
        "tokenize said": ("POST", "/tokenize", {"messages": SAID}),
        "tokenize said as vLLM": (
            "POST",
            "/tokenize",
            {"messages": json.loads(json.dumps(SAID).replace("_content", ""))},
        ),
    }
    for name, (path, fields, _) in STRUCTURED.items():
        calls[name] = ("POST", path, body(path, ignore_eos=False, max_tokens=64, **fields))
    for name, (path, fields, _) in REFUSED.items():
        calls[name] = ("POST", path, body(path, **{"ignore_eos": False, **fields}))
    responses = asyncio.run(door(tiny_llama, list(calls.values())))
    return dict(zip(calls, responses, strict=True))


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def test_return_token_ids_are_the_prompts_and_the_greedy_tokens(answers, tiny_llama):
    model = monolithic(tiny_llama)
    chat, text = ok(answers["chat"]), ok(answers["text"])
    chat_prompt, text_prompt = (ok(answers[f"tokenize {k}"])["tokens"] for k in ("chat", "text"))
    assert chat["prompt_token_ids"] == chat_prompt  # on the response, as vLLM's chat
    assert chat["choices"][0]["token_ids"] == greedy_reference(model, chat_prompt, 8)
    (choice,) = text["choices"]
    assert choice["prompt_token_ids"] == text_prompt and "prompt_token_ids" not in text  # per choice
    assert choice["token_ids"] == greedy_reference(model, text_prompt, 8)
    assert len(choice["token_ids"]) == text["usage"]["completion_tokens"]
    two = ok(answers["two prompts"])["choices"]
    assert [len(c["prompt_token_ids"]) for c in two] == [len(text_prompt), len(text_prompt) + 3]


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_streamed_token_ids_are_the_deltas_and_the_prompt_comes_first(answers, kind):
    whole, streamed = ok(answers[kind]), chunks(answers[f"{kind} streamed"])
    tokens = [t for c in streamed for choice in c["choices"] for t in choice["token_ids"]]
    assert tokens == whole["choices"][0]["token_ids"]
    holder = (lambda c: c) if kind == "chat" else (lambda c: c["choices"][0])
    prompts = [holder(c).get("prompt_token_ids") for c in streamed]
    expected = whole["prompt_token_ids"] if kind == "chat" else whole["choices"][0]["prompt_token_ids"]
    assert prompts[0] == expected and not any(prompts[1:])  # (the first chunk only)


@pytest.mark.parametrize("name", list(STRUCTURED))
def test_structured_outputs_and_grammars_are_followed(answers, name):
    data = ok(answers[name])
    choice = data["choices"][0]
    output = choice["message"]["content"] if "message" in choice else choice["text"]
    assert re.fullmatch(STRUCTURED[name][2], output), output
    assert choice["finish_reason"] == "stop", choice  # the grammar ended it
    if name == "json_object":
        assert isinstance(json.loads(output), dict)


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_is_not_implemented_or_wrong_is_a_400_naming_it(answers, name):
    r = answers[name]
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if REFUSED[name][2] is not None:
        assert error["param"] == REFUSED[name][2], error
    assert "internal" not in error["message"] and len(error["message"]) < 400, error


def test_an_assistants_earlier_thought_reaches_the_chat_template(answers, tiny_llama):
    ok(answers["said"])
    said, alias = ok(answers["tokenize said"])["tokens"], ok(answers["tokenize said as vLLM"])["tokens"]
    rendered = "user: hi;<think>assistant: yes;user: hi;assistant:"
    assert ok(answers["said"])["prompt_token_ids"] == said == alias
    assert said == AutoTokenizer.from_pretrained(tiny_llama).encode(rendered, add_special_tokens=False)
