"""What vLLM's own OpenAI tests send, at the door of a peer of the tiny Llama (in process, over
httpx): `model` left out, stream_options checked and continuous usage, prompt_logprobs null
where not asked, echo of token ids, max_tokens past the context refused before any queue, every
bad logit_bias entry named, return_tokens_as_token_ids, a chat's echo, truncate_prompt_tokens."""

import asyncio
import json

import httpx
import pytest

from peers.server import create_app
from tests.peers.test_inprocess import start_swarm, stop_swarm

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
GREEDY = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
CALLS = {  # name: (path, body)
    "no model": (CHAT, {"messages": HI, **GREEDY}),
    "response without model": ("/v1/responses", {"input": "hi", "max_output_tokens": 3, "temperature": 0}),
    "model null": (TEXT, {"model": None, "prompt": "hello", **GREEDY}),
    "stream_options unstreamed": (
        CHAT,
        {"messages": HI, "stream_options": {"include_usage": True}, **GREEDY},
    ),
    "continuous usage": (
        TEXT,
        {
            "prompt": "hello",
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        | GREEDY,
    ),
    "continuous without usage": (
        TEXT,
        {"prompt": "hello", "stream": True, "stream_options": {"continuous_usage_stats": True}} | GREEDY,
    ),
    "echo ids": (TEXT, {"prompt": [0, 0, 5, 6], "echo": True, "logprobs": 1, **GREEDY}),
    "max_tokens past the context": (TEXT, {"prompt": "hello", "max_tokens": 10**6}),
    "bad logit_bias keys": (TEXT, {"prompt": "hello", "logit_bias": {"bad1": 1, "bad2": 2}, **GREEDY}),
    "logit_bias outside": (TEXT, {"prompt": "hello", "logit_bias": {"99999": 1, "99998": 1}, **GREEDY}),
    "as ids": (
        CHAT,
        {"messages": HI, "logprobs": True, "top_logprobs": 2, "return_tokens_as_token_ids": True} | GREEDY,
    ),
    "text as ids": (TEXT, {"prompt": "hello", "logprobs": 1, "return_tokens_as_token_ids": True, **GREEDY}),
    "chat echo": (
        CHAT,
        {
            "messages": [*HI, {"role": "assistant", "content": "Once upon"}],
            "echo": True,
            "continue_final_message": True,
            "add_generation_prompt": False,
            **GREEDY,
        },
    ),
    "chat echo of a user": (CHAT, {"messages": HI, "echo": True, **GREEDY}),
    "whole prompt": (TEXT, {"prompt": "one two three four five six", "return_token_ids": True, **GREEDY}),
    "left": (
        TEXT,
        {"prompt": "one two three four five six", "return_token_ids": True, "truncate_prompt_tokens": 3},
    ),
    "right": (
        TEXT,
        {"prompt": "one two three four five six", "return_token_ids": True}
        | {"truncate_prompt_tokens": 3, "truncation_side": "right"},
    ),
    "side alone": (TEXT, {"prompt": "hello", "truncation_side": "left", **GREEDY}),
}


async def door(model) -> dict[str, httpx.Response]:
    _, (node,) = await start_swarm(model, ["0:4"])
    try:
        transport = httpx.ASGITransport(app=create_app(node), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://peer", timeout=60) as http:
            return {name: await http.post(path, json=b) for name, (path, b) in CALLS.items()}
    finally:
        await stop_swarm([node])


@pytest.fixture(scope="module")
def answers(tiny_llama) -> dict[str, httpx.Response]:
    return asyncio.run(door(tiny_llama))


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def refused(r: httpx.Response, param: str | None = None) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert param is None or error["param"] == param, error
    return error["message"]


def chunks(r: httpx.Response) -> list[dict]:
    data = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"]


def test_a_request_without_model_is_the_served_models(answers):
    assert ok(answers["no model"])["model"] == "llama"
    assert ok(answers["model null"])["model"] == "llama"
    assert ok(answers["response without model"])["model"] == "llama"


def test_stream_options_go_with_a_stream_and_usage_can_come_on_every_chunk(answers):
    assert "stream_options" in refused(answers["stream_options unstreamed"])
    every = chunks(answers["continuous usage"])
    assert every and all(c["usage"]["total_tokens"] > 0 for c in every)
    counted = [c["usage"]["completion_tokens"] for c in every if c["choices"]]
    assert counted == sorted(counted) and counted[-1] == 4
    assert all("usage" not in c for c in chunks(answers["continuous without usage"]))


def test_prompt_logprobs_are_null_where_not_asked(answers):
    assert ok(answers["no model"])["prompt_logprobs"] is None
    assert ok(answers["model null"])["choices"][0]["prompt_logprobs"] is None


def test_an_echo_of_token_ids_holds_their_special_tokens_and_offsets_point_into_it(answers):
    choice = ok(answers["echo ids"])["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith("".join(lp["tokens"][:4]))
    assert lp["text_offset"] == sorted(lp["text_offset"])
    assert all(choice["text"][o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"], strict=True))


def test_max_tokens_past_the_context_is_refused_at_once(answers):
    r = answers["max_tokens past the context"]
    refused(r, "max_tokens")
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_every_bad_logit_bias_entry_is_named(answers):
    message = refused(answers["bad logit_bias keys"])
    assert "bad1" in message and "bad2" in message
    message = refused(answers["logit_bias outside"], "logit_bias")
    assert "99998" in message and "99999" in message


def test_logprobs_name_tokens_by_id_where_asked(answers):
    content = ok(answers["as ids"])["choices"][0]["logprobs"]["content"]
    assert all(e["token"].startswith("token_id:") for e in content)
    assert all(a["token"].startswith("token_id:") for e in content for a in e["top_logprobs"])
    lp = ok(answers["text as ids"])["choices"][0]["logprobs"]
    assert all(t.startswith("token_id:") for t in lp["tokens"])


def test_a_chat_echo_starts_with_the_continued_message(answers):
    assert ok(answers["chat echo"])["choices"][0]["message"]["content"].startswith("Once upon")
    plain = ok(answers["no model"])["choices"][0]["message"]["content"]
    assert ok(answers["chat echo of a user"])["choices"][0]["message"]["content"] == plain


def test_truncate_prompt_tokens_keeps_either_end(answers):
    whole = ok(answers["whole prompt"])["choices"][0]["prompt_token_ids"]
    assert len(whole) > 3
    assert ok(answers["left"])["choices"][0]["prompt_token_ids"] == whole[-3:]
    assert ok(answers["right"])["choices"][0]["prompt_token_ids"] == whole[:3]
    assert "truncate_prompt_tokens" in refused(answers["side alone"])
