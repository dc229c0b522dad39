"""The OpenAI door driven by the openai package: streamed and whole answers, every prompt form,
logprobs, sampling controls, structured output and tool calls. Every test checks what comes back
(texts, logprobs, parsed objects, tool calls), not only that an answer came."""

import json

import openai
import pytest

from tests.peers.api.compat.common import (
    PROMPTS,
    SCHEMAS,
    TOOLS,
    WEATHER,
    City,
    chat,
    check_calls,
    complete,
    tokenize,
)

pytestmark = pytest.mark.slow


def test_streamed_chat_equals_whole_and_ends_with_usage(client, model_id):
    whole = chat(client, model_id)
    text = whole.choices[0].message.content
    assert "Red" in text and whole.choices[0].finish_reason == "stop"
    assert whole.system_fingerprint and whole.system_fingerprint.startswith("fp_")
    chunks = list(chat(client, model_id, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert last.choices == [] and [getattr(last.usage, k) for k in counts] == [
        getattr(whole.usage, k) for k in counts
    ]
    assert last.usage.prompt_tokens_details.cached_tokens > 0  # (the same prompt again: its prefix was kept)
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.system_fingerprint for c in chunks} == {whole.system_fingerprint}


def test_completions_take_every_prompt_form(client, model_id, addr):
    both = complete(client, model_id, prompt=PROMPTS)
    alone = [complete(client, model_id, prompt=p).choices[0].text for p in PROMPTS]
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == alone and alone[0].startswith(" Paris")
    ids = [tokenize(addr, p) for p in PROMPTS]
    assert [c.text for c in complete(client, model_id, prompt=ids).choices] == alone
    assert complete(client, model_id, prompt=ids[1]).choices[0].text == alone[1]
    echoed = complete(client, model_id, echo=True).choices[0].text
    assert echoed == PROMPTS[0] + alone[0]


def test_completions_n_best_of_and_seed(client, model_id):
    three = complete(client, model_id, temperature=1, n=3, seed=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.text for c in three.choices}) > 1  # three samples, not one copied
    again = complete(client, model_id, temperature=1, n=3, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in three.choices]
    best = complete(client, model_id, temperature=1, n=2, best_of=4, seed=3, logprobs=1)
    totals = [sum(c.logprobs.token_logprobs) for c in best.choices]
    assert len(totals) == 2 and totals[0] >= totals[1], totals


def test_logprobs_are_sorted_and_agree_with_the_sampled_token(client, model_id):
    for temperature, seed in ((0, None), (1, 11)):
        r = chat(
            client, model_id, max_tokens=12, logprobs=True, top_logprobs=5, temperature=temperature, seed=seed
        )
        content = r.choices[0].logprobs.content
        assert "".join(t.token for t in content) == r.choices[0].message.content
        for t in content:
            alts = [a.logprob for a in t.top_logprobs]
            assert len(alts) == 5 and alts == sorted(alts, reverse=True), t
            assert t.logprob <= 0 and bytes(t.bytes).decode() == t.token
            mine = [a.logprob for a in t.top_logprobs if a.token == t.token]
            if mine:
                assert mine[0] == pytest.approx(t.logprob, abs=1e-5), t
            if temperature == 0:  # greedy: the sampled token is the likeliest
                assert t.top_logprobs[0].token == t.token, t
    lp = complete(client, model_id, max_tokens=4, logprobs=3).choices[0].logprobs
    assert "".join(lp.tokens) == " Paris.\n\n" and lp.text_offset == [0, 6, 7, 8]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert list(top.values()) == sorted(top.values(), reverse=True) and len(top) == 3
        assert max(top, key=top.get) == token and top[token] == pytest.approx(logprob, abs=1e-5)


def test_sampling_controls(client, model_id, addr):
    greedy = complete(client, model_id).choices[0].text
    paris = tokenize(addr, " Paris")
    assert len(paris) == 1
    banned = complete(client, model_id, logit_bias={str(paris[0]): -100}).choices[0].text
    assert "Paris" not in banned, banned
    forced = complete(client, model_id, logit_bias={str(paris[0]): 100}).choices[0].text
    assert forced == " Paris" * 8
    only_top = complete(client, model_id, temperature=1, seed=5, extra_body={"min_p": 1.0})
    assert only_top.choices[0].text == greedy  # min_p 1 keeps only the likeliest token
    seeded = [complete(client, model_id, temperature=1, seed=s).choices[0].text for s in (5, 5, 6)]
    assert seeded[0] == seeded[1] != seeded[2]
    red = "red red red red red red red red red red"
    plain = complete(client, model_id, prompt=red, max_tokens=10).choices[0].text
    assert plain.count("red") >= 6
    for extra in (
        {"frequency_penalty": 2},
        {"presence_penalty": 2},
        {"extra_body": {"repetition_penalty": 2.0}},
    ):
        penalized = complete(client, model_id, prompt=red, max_tokens=10, **extra).choices[0].text
        assert penalized.count("red") <= 1, (extra, penalized)
    short = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    assert chat(client, model_id, short, max_tokens=16).usage.completion_tokens < 12
    longer = chat(client, model_id, short, max_tokens=16, extra_body={"min_tokens": 12})
    assert longer.usage.completion_tokens >= 12
    period = tokenize(addr, ".")[0]
    cut = complete(client, model_id, extra_body={"stop_token_ids": [period]}).choices[0]
    assert cut.text == " Paris" and cut.finish_reason == "stop"


def test_parse_gives_a_pydantic_object(client, model_id):
    messages = [{"role": "user", "content": "Describe Paris as JSON with its name and country."}]
    # chat.completions.parse in recent openai releases, beta.chat.completions.parse in older ones
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model=model_id, messages=messages, response_format=City, max_tokens=60, temperature=0)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name == "Paris" and parsed.country, r
    assert City.model_validate_json(r.choices[0].message.content) == parsed


def test_json_object_parses(client, model_id):
    messages = [{"role": "user", "content": "Give a JSON object with the keys name and age of a person."}]
    r = chat(client, model_id, messages, max_tokens=60, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "add"}}], ids=["required", "named"]
)
def test_forced_tool_calls_follow_the_schema(client, model_id, choice):
    """Forced calls with parallel calls allowed (the default): every call is well formed, and
    none of the call syntax is left in the content."""
    # parallel calls allowed, the default model writes its call again; the server ends the
    # generation at the repeat (about 75 tokens), so the budget leaves room for that
    r = chat(client, model_id, WEATHER, max_tokens=160, tools=TOOLS, tool_choice=choice)
    message, finish = r.choices[0].message, r.choices[0].finish_reason
    names = {"add"} if isinstance(choice, dict) else set(SCHEMAS)
    calls = check_calls(message.tool_calls, names)
    assert finish == "tool_calls", (finish, calls)
    assert "<tool_call>" not in (message.content or ""), (message.content, calls, r.usage)


@pytest.mark.parametrize("stream", [False, True])
def test_one_call_without_parallel_calls(client, model_id, stream):
    kw = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    r = chat(client, model_id, WEATHER, max_tokens=64, **kw)
    message = r.choices[0].message
    assert check_calls(message.tool_calls, set(SCHEMAS)) == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})
    ]
    assert message.content is None and r.choices[0].finish_reason == "tool_calls"
    if stream:  # the streamed deltas accumulate to the same call
        calls: dict[int, dict] = {}
        finish, content = None, ""
        for chunk in chat(client, model_id, WEATHER, max_tokens=64, stream=True, **kw):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
            for d in delta.tool_calls or ():
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += d.id or ""
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
        assert finish == "tool_calls" and content == "", (finish, content)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
            (t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls
        ]
        assert calls[0]["id"].startswith("call_")


def test_tool_history_and_tool_choice_none(client, model_id):
    """An assistant turn of calls (content null) and the tool's answer are taken as history; the
    model's reply (greedy) uses the answer."""
    history = [
        {"role": "system", "content": "Answer the user in one sentence using the tool's result."},
        *WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny"},
    ]
    answer = chat(client, model_id, history, max_tokens=30, tools=TOOLS)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "stop"
    assert "22" in answer.choices[0].message.content, answer
    plain = chat(client, model_id, WEATHER, max_tokens=30, tools=TOOLS, tool_choice="none").choices[0]
    assert plain.message.tool_calls is None and "Paris" in plain.message.content
    assert plain.finish_reason in ("stop", "length")


def test_unknown_parameters_are_refused_by_name(client, model_id):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, model_id, max_tokens=2, extra_body={"foo": 1})
    assert e.value.status_code == 400 and "foo" in e.value.message and e.value.param == "foo"
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, model_id, max_tokens=2, extra_body={"foo": 1})
    assert "foo" in e.value.message
    meta = chat(
        client, model_id, max_tokens=24, user="u1", metadata={"k": "v"}, store=False, service_tier="auto"
    )
    assert meta.choices[0].message.content == chat(client, model_id).choices[0].message.content
