"""The OpenAI door of a real swarm of the default model (two peers), driven by the clients people
use: the openai package, langchain-openai and litellm. Every test checks what comes back (texts,
logprobs, parsed objects, tool calls, schemas), not only that an answer came."""

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.peers.processes import Swarm

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm goes online at import otherwise

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time"]
COLORS = [{"role": "user", "content": "Name three colors."}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD_ARGS = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": WEATHER_ARGS,
        },
    },
    {
        "type": "function",
        "function": {"name": "add", "description": "Add two integers", "parameters": ADD_ARGS},
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class City(BaseModel):
    """A city and its country."""

    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


@pytest.fixture(scope="module")
def swarm(default_model, tmp_path_factory):
    swarm = Swarm("smollm2-135m", tmp_path_factory.mktemp("compat-logs"))
    try:
        swarm.add("0:15")
        swarm.add("15:30")
        swarm.wait_ready(timeout_s=300)
        swarm.wait_route(swarm.peers[0])
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def addr(swarm) -> str:
    return swarm.peers[0].address


@pytest.fixture(scope="module")
def client(addr):
    with openai.OpenAI(base_url=f"http://{addr}/v1", api_key="none", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def model_id(client) -> str:
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-135m"], models
    return models[0].id


def chat(client, model_id, messages=COLORS, max_tokens=24, **kw):
    return client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=max_tokens, temperature=kw.pop("temperature", 0), **kw
    )


def complete(client, model_id, prompt=PROMPTS[0], max_tokens=8, **kw):
    return client.completions.create(
        model=model_id, prompt=prompt, max_tokens=max_tokens, temperature=kw.pop("temperature", 0), **kw
    )


def tokenize(addr: str, text: str) -> list[int]:
    return httpx.post(f"http://{addr}/tokenize", json={"prompt": text}, timeout=30).json()["tokens"]


def check_calls(calls, names: set[str]) -> list[tuple[str, dict]]:
    """The calls as (name, arguments), each arguments valid against its function's schema."""
    assert calls, "no tool calls"
    out = []
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in names, call
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


# --- the openai package


def test_streamed_chat_equals_whole_and_ends_with_usage(client, model_id):
    whole = chat(client, model_id)
    text = whole.choices[0].message.content
    assert "Red" in text and whole.choices[0].finish_reason == "stop"
    assert whole.system_fingerprint and whole.system_fingerprint.startswith("fp_")
    chunks = list(chat(client, model_id, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage == whole.usage, last
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


# --- langchain-openai


@pytest.fixture(scope="module")
def lc(addr, model_id):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=f"http://{addr}/v1",
        api_key="none",
        model=model_id,
        temperature=0,
        max_tokens=160,  # room for a model that repeats its tool call to be stopped at the repeat
        max_retries=0,
        timeout=300,
    )


def test_langchain_invoke_stream_batch(lc, client, model_id):
    text = lc.invoke("Name three colors.").content
    assert text == chat(client, model_id, max_tokens=64).choices[0].message.content
    assert "".join(c.content for c in lc.stream("Name three colors.")) == text
    batch = lc.batch(["Name three colors.", "What is 2+2?"])
    assert batch[0].content == text and "4" in batch[1].content


@pytest.mark.parametrize("method", ["json_schema", "json_mode", "function_calling"])
def test_langchain_structured_output(lc, method):
    structured = (
        lc.with_structured_output(City)
        if method == "json_schema"
        else lc.with_structured_output(City, method=method)
    )
    city = structured.invoke("Describe Paris as a JSON object with the keys name and country.")
    assert isinstance(city, City) and city.name == "Paris" and city.country, city


def test_langchain_tool_round_trip(lc):
    from langchain_core.messages import HumanMessage, ToolMessage

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    messages = [HumanMessage("What is 6 times 7?")]
    call = lc.bind_tools([multiply], tool_choice="multiply").invoke(messages)
    assert call.tool_calls and call.response_metadata["finish_reason"] == "tool_calls"
    assert all(c["name"] == "multiply" and set(c["args"]) == {"a", "b"} for c in call.tool_calls)
    messages += [
        call,
        *(ToolMessage(str(multiply(**c["args"])), tool_call_id=c["id"]) for c in call.tool_calls),
    ]
    answer = lc.bind_tools([multiply]).invoke(messages)
    assert not answer.tool_calls and isinstance(answer.content, str) and answer.content.strip()
    assert str(multiply(**call.tool_calls[0]["args"])) in answer.content, answer.content
    assert "<tool_call>" not in call.content, call  # the call syntax is not left in the content


def test_langchain_completion_llm(addr, model_id, client):
    from langchain_openai import OpenAI

    llm = OpenAI(
        base_url=f"http://{addr}/v1",
        api_key="none",
        model=model_id,
        temperature=0,
        max_tokens=16,
        max_retries=0,
    )
    assert llm.invoke(PROMPTS[1]) == complete(client, model_id, PROMPTS[1], max_tokens=16).choices[0].text


# --- litellm


@pytest.fixture(scope="module")
def litellm_kw(addr, model_id) -> dict:
    return {
        "model": f"openai/{model_id}",
        "api_base": f"http://{addr}/v1",
        "api_key": "none",
        "temperature": 0,
    }


def test_litellm_matches_the_openai_package(litellm_kw, client, model_id):
    import litellm

    expected = chat(client, model_id).choices[0].message.content
    whole = litellm.completion(messages=COLORS, max_tokens=24, **litellm_kw)
    assert whole.choices[0].message.content == expected and whole.usage.completion_tokens > 0
    stream = litellm.completion(messages=COLORS, max_tokens=24, stream=True, **litellm_kw)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_litellm_json_schema(litellm_kw):
    import litellm

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Invent a person as JSON with name and age."}]
    r = litellm.completion(messages=messages, max_tokens=60, response_format=fmt, **litellm_kw)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


# --- structured output at scale

WORDS = [
    "title",
    "count",
    "price",
    "active",
    "color",
    "tags",
    "owner",
    "score",
    "city",
    "level",
    "label",
    "rating",
    "enabled",
    "kind",
    "items",
    "author",
    "weight",
    "visible",
    "status",
    "notes",
    "year",
    "size",
    "flag",
    "mode",
    "origin",
]
ENUMS = [["red", "green", "blue"], ["low", "mid", "high"], ["yes", "no"], ["cat", "dog", "bird", "fish"]]


def leaf_schema(rng: random.Random) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum"])
    if kind == "string":
        return {"type": "string", "minLength": 1, "maxLength": rng.randint(3, 12)}
    if kind in ("integer", "number"):
        low = rng.randint(-50, 50)
        return {"type": kind, "minimum": low, "maximum": low + rng.randint(1, 500)}
    if kind == "boolean":
        return {"type": "boolean"}
    return {"type": "string", "enum": rng.choice(ENUMS)}


def object_schema(rng: random.Random, fields: int, nested: bool) -> dict:
    names = rng.sample(WORDS, fields)
    props = {}
    for name in names:
        kind = rng.choice(["leaf", "leaf", "leaf", "array", "object"]) if nested else "leaf"
        if kind == "array":
            props[name] = {
                "type": "array",
                "items": leaf_schema(rng),
                "minItems": 1,
                "maxItems": rng.randint(1, 3),
            }
        elif kind == "object":
            props[name] = object_schema(rng, rng.randint(1, 2), nested=False)
        else:
            props[name] = leaf_schema(rng)
    required = [n for n in names if rng.random() < 0.7] or names[:1]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def test_fifty_different_schemas_always_validate(client, model_id):
    schemas = [
        object_schema(random.Random(i), random.Random(1000 + i).randint(2, 4), nested=True) for i in range(50)
    ]
    assert len({json.dumps(s, sort_keys=True) for s in schemas}) == 50

    def one(i: int) -> tuple[str, str]:
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": f"record_{i}", "schema": schemas[i], "strict": True},
        }
        ask = f"Write one JSON object with the fields {', '.join(schemas[i]['properties'])}."
        r = chat(
            client,
            model_id,
            [{"role": "user", "content": ask}],
            max_tokens=200,
            temperature=0.7,
            seed=i,
            response_format=fmt,
        )
        return r.choices[0].message.content, r.choices[0].finish_reason

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:  # (the peers batch them: more at once, less wall time)
        outputs = list(pool.map(one, range(50)))
    print(f"50 schemas: {time.monotonic() - start:.1f} s")
    bad = []
    for i, (text, finish) in enumerate(outputs):
        try:
            jsonschema.validate(json.loads(text), schemas[i])
        except (ValueError, jsonschema.ValidationError) as e:
            bad.append((i, finish, text, str(e)[:200]))
    assert not bad, bad
