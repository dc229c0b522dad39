"""The Responses API (POST/GET/DELETE /v1/responses) driven by the openai package, at the door of
a peer of the default model (in process, over httpx2's ASGI transport): greedy text equal to the
chat path's for the same conversation (plain, instructions, tool results, previous_response_id),
forced function calls whose arguments follow the schema, text.format json_schema, streamed events
in OpenAI's order ending as the whole answer, store false, refusals by name, max_output_tokens;
with a thinking chat template, the thought as a reasoning item."""

import asyncio
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
import jsonschema
import openai
import pytest

from peers.server import create_app
from tests.peers.api.compat.common import WEATHER_ARGS, City
from tests.peers.api.test_reasoning_door import MESSAGES, QWEN3_LIKE
from tests.peers.test_inprocess import start_swarm, stop_swarm

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": WEATHER_ARGS,
    "strict": True,
}
CHAT_TOOL = {"type": "function", "function": {k: TOOL[k] for k in ("name", "description", "parameters")}}
FORCED = {"type": "function", "name": "get_weather"}
CITY = {
    "type": "json_schema",
    "name": "city",
    "schema": City.model_json_schema() | {"additionalProperties": False},
    "strict": True,
}


@dataclass
class Door:
    """The peer's door: `run(coro)` runs a coroutine on the loop the peer lives in."""

    run: Any
    client: openai.AsyncOpenAI
    http: httpx2.AsyncClient
    model: str

    def create(self, **kw):
        kw = {"model": self.model, "temperature": 0, "max_output_tokens": 24, **kw}
        return self.run(self.client.responses.create(**kw))

    def chat(self, messages: list[dict], max_tokens: int = 24, **kw) -> str:
        kw = {"temperature": 0, **kw}
        made = self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_tokens, **kw
        )
        return self.run(made)

    def refused(self, error=openai.BadRequestError, **kw) -> dict:
        with pytest.raises(error) as caught:
            self.create(**kw)
        return caught.value.body


@contextmanager
def opened(model, settings: dict | None = None):
    """A door of one peer of `model` (NodeConfig `settings`), on an event loop of its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=600)

    async def clients(node):
        http = httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=create_app(node)), base_url="http://peer"
        )
        client = openai.AsyncOpenAI(
            base_url="http://peer/v1", api_key="none", http_client=http, max_retries=0, timeout=300
        )
        return client, http

    _, (node,) = run(start_swarm(model, ["0:30"], settings={0: settings or {}}))
    try:
        client, http = run(clients(node))
        yield Door(run, client, http, node.served_model)
        run(client.close())
    finally:
        run(stop_swarm([node]))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture(scope="module")
def door(default_model):
    with opened(default_model) as d:
        yield d


def test_text_equals_the_chat_path(door):
    r = door.create(input=QUESTION)
    chat = door.chat([{"role": "user", "content": QUESTION}])
    assert r.id.startswith("resp_") and r.object == "response" and r.model == door.model
    assert r.output_text == chat.choices[0].message.content and r.output_text
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [(p.type, p.annotations) for p in item.content] == [("output_text", [])]
    assert (r.status, chat.choices[0].finish_reason) in (("completed", "stop"), ("incomplete", "length"))
    assert (r.usage.input_tokens, r.usage.output_tokens) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )
    assert (
        r.usage.total_tokens == chat.usage.total_tokens
        and r.usage.output_tokens_details.reasoning_tokens == 0
    )
    assert (r.temperature, r.max_output_tokens, r.store, r.tools) == (0, 24, True, [])
    fr = "Answer in French."
    r = door.create(input=QUESTION, instructions=fr)
    chat = door.chat([{"role": "system", "content": fr}, {"role": "user", "content": QUESTION}])
    assert r.output_text == chat.choices[0].message.content and r.instructions == fr


def test_a_forced_call_then_its_output(door):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = door.create(
        input=question, tools=[TOOL], tool_choice=FORCED, parallel_tool_calls=False, max_output_tokens=60
    )
    (call,) = r.output
    assert r.status == "completed" and r.parallel_tool_calls is False, r
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_ARGS)
    assert r.tool_choice.name == "get_weather" and r.tools[0].name == "get_weather"
    result = json.dumps({"temperature_c": 21, "sky": "clear"})
    answered = door.create(
        input=[
            *question,
            *r.output,
            {"type": "function_call_output", "call_id": call.call_id, "output": result},
        ],
        tools=[TOOL],
    )
    assert [i.type for i in answered.output] == ["message"] and answered.output_text
    chat_call = {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    messages = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [chat_call]},
        {"role": "tool", "tool_call_id": call.call_id, "content": result},
    ]
    assert answered.output_text == door.chat(messages, tools=[CHAT_TOOL]).choices[0].message.content


def test_json_schema_output_validates(door):
    ask = "Name a city in Japan, as JSON."
    r = door.create(input=ask, text={"format": CITY}, max_output_tokens=60)
    assert r.status == "completed", r
    City.model_validate_json(r.output_text)
    assert r.text.format.type == "json_schema" and r.text.format.name == "city"
    parsed = door.run(
        door.client.responses.parse(
            model=door.model, input=ask, text_format=City, temperature=0, max_output_tokens=60
        )
    )
    assert isinstance(parsed.output_parsed, City), parsed
    r = door.create(
        input='Reply with {"ok": true}', text={"format": {"type": "json_object"}}, max_output_tokens=48
    )
    assert r.status == "completed" and isinstance(json.loads(r.output_text), dict), r


async def streamed(client, **kw):
    async with client.responses.stream(**kw) as stream:
        events = [e async for e in stream]
        return events, await stream.get_final_response()


def test_streamed_events_come_in_order_and_end_as_the_whole_answer(door):
    whole = door.create(input=QUESTION)
    kw = {"model": door.model, "input": QUESTION, "temperature": 0, "max_output_tokens": 24}
    events, final = door.run(streamed(door.client, **kw))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 1 and kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response." + whole.status,
    ], kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == final.output_text
    assert {e.item_id for e in events if hasattr(e, "item_id")} == {final.output[0].id}
    assert final.usage == whole.usage and final.id == events[0].response.id


def test_a_streamed_call_and_the_raw_events(door):
    kw = {
        "input": "What is the weather in Paris?",
        "tools": [TOOL],
        "tool_choice": FORCED,
        "max_output_tokens": 60,
    }
    whole = door.create(parallel_tool_calls=False, **kw)
    events, final = door.run(
        streamed(door.client, model=door.model, temperature=0, parallel_tool_calls=False, **kw)
    )
    kinds = [e.type for e in events]
    assert kinds[-4:] == [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ], kinds
    assert final.output[0].arguments == whole.output[0].arguments
    body = {"model": door.model, "input": QUESTION, "temperature": 0, "max_output_tokens": 4, "stream": True}
    raw = door.run(door.http.post("/v1/responses", json=body))
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in raw.text.split("\n\n") if b.strip()]
    for block in blocks:
        name, data = block.split("\n")
        assert name == "event: " + json.loads(data.removeprefix("data: "))["type"], block
    assert blocks[-1].startswith("event: response.incomplete\n"), blocks[-1]


def test_previous_response_id_continues_the_conversation(door):
    first = door.create(input="My name is Ada.", max_output_tokens=16)
    then = "What is my name?"
    r = door.create(input=then, previous_response_id=first.id, max_output_tokens=16)
    assert r.previous_response_id == first.id
    messages = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": then},
    ]
    assert r.output_text == door.chat(messages, max_tokens=16).choices[0].message.content
    kept = door.run(door.client.responses.retrieve(first.id))
    assert kept.id == first.id and kept.output_text == first.output_text
    door.run(door.client.responses.delete(first.id))
    with pytest.raises(openai.NotFoundError):
        door.run(door.client.responses.retrieve(first.id))


def test_store_false_keeps_nothing(door):
    r = door.create(input=QUESTION, store=False, max_output_tokens=4)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        door.run(door.client.responses.retrieve(r.id))
    error = door.refused(openai.NotFoundError, input="again", previous_response_id=r.id)
    assert (error["param"], error["code"]) == ("previous_response_id", "previous_response_not_found"), error


IMAGE = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}]


@pytest.mark.parametrize(
    ("field", "param", "named"),
    [
        ({"include": ["reasoning.encrypted_content"]}, "include", "'reasoning.encrypted_content'"),
        ({"background": True}, "background", "only false"),
        ({"tools": [{"type": "web_search"}]}, "tools.0", "'web_search'"),
        ({"input": IMAGE}, "input.0.content.0", "'input_image'"),
        ({"text": {"format": {"type": "text"}, "verbosity": "low"}}, "text.verbosity", "'text.verbosity'"),
        (
            {"reasoning": {"effort": "low"}},
            "reasoning.effort",
            "reasoning.effort:",
        ),  # (the template reads none)
    ],
)
def test_an_unserved_field_is_a_400_naming_it(door, field, param, named):
    error = door.refused(**{"input": QUESTION, **field})
    assert error["param"] == param and named in error["message"], error


LOGPROBS = {"include": ["message.output_text.logprobs"], "top_logprobs": 3}


def entries(logprobs) -> list[tuple]:
    """(token, logprob rounded, its alternatives' tokens) of each token's logprobs."""
    return [(lp.token, round(lp.logprob, 4), [t.token for t in lp.top_logprobs]) for lp in logprobs]


def test_output_text_logprobs_are_the_chat_paths(door):
    """include's logprobs: the output_text part carries each token's, as the chat path gives them
    for the same conversation; streamed, the text deltas carry them, together the whole's."""
    r = door.create(input=QUESTION, **LOGPROBS)
    chat = door.chat([{"role": "user", "content": QUESTION}], logprobs=True, top_logprobs=3)
    part = r.output[0].content[0]
    assert part.text == chat.choices[0].message.content and r.top_logprobs == 3
    assert entries(part.logprobs) == entries(chat.choices[0].logprobs.content)
    assert all(len(lp.top_logprobs) == 3 and lp.bytes == list(lp.token.encode()) for lp in part.logprobs)
    kw = {"model": door.model, "input": QUESTION, "temperature": 0, "max_output_tokens": 24, **LOGPROBS}
    events, final = door.run(streamed(door.client, **kw))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert all(e.logprobs for e in deltas)
    assert entries([lp for e in deltas for lp in e.logprobs]) == entries(part.logprobs)
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert entries(done.logprobs) == entries(final.output[0].content[0].logprobs) == entries(part.logprobs)
    plain = door.create(input=QUESTION)  # (not asked: none)
    assert plain.output[0].content[0].logprobs == [] and plain.top_logprobs is None


def test_vllms_request_forms_are_taken(door):
    """As vLLM's Responses API takes them: background false, tools [], reasoning.effort "none" (a
    model that does not think), a replayed reasoning item with a null encrypted_content, and the
    sampling extensions, which sample as the chat path's do."""
    extras = {"top_k": 40, "repetition_penalty": 1.2, "seed": 42, "min_p": 0.05, "stop": ["\n\n"]}
    replay = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"type": "reasoning", "summary": [], "encrypted_content": None},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ]
    r = door.create(
        input=replay,
        background=False,
        tools=[],
        reasoning={"effort": "none"},
        temperature=0.7,
        extra_body=extras,
    )
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]
    chat = door.chat([*messages, {"role": "user", "content": QUESTION}], temperature=0.7, extra_body=extras)
    assert r.status in ("completed", "incomplete") and r.background is False
    assert r.reasoning.effort == "none" and r.output_text == chat.choices[0].message.content
    again = door.create(input=replay, temperature=0.7, extra_body={**extras, "seed": 7})
    assert again.output_text != r.output_text  # (the seed samples: another seed, another text)


def test_max_output_tokens_cuts_the_answer(door):
    r = door.create(input=QUESTION, max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 3


def test_a_thought_comes_as_a_reasoning_item(default_model):
    with opened(default_model, {"chat_template": QWEN3_LIKE}) as door:
        r = door.create(input=MESSAGES)
        message = door.chat(MESSAGES).choices[0].message
        kw = {"model": door.model, "input": MESSAGES, "temperature": 0, "max_output_tokens": 24}
        events, final = door.run(streamed(door.client, **kw))
        off = door.create(input=MESSAGES, reasoning={"effort": "none"})
        off_chat = door.chat(MESSAGES, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    thought, answer = r.output
    assert thought.type == "reasoning" and thought.id.startswith("rs_") and thought.summary == []
    assert [(c.type, c.text) for c in thought.content] == [("reasoning_text", message.reasoning_content)]
    assert answer.type == "message" and r.output_text == message.content and "<think>" not in r.output_text
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    said = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert said == message.reasoning_content and final.output_text == r.output_text
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == [0, 1]
    # effort "none": the template's enable_thinking false, no thought
    assert [i.type for i in off.output] == ["message"] and off.reasoning.effort == "none"
    assert off.output_text == off_chat.choices[0].message.content and off.output_text
    assert off.usage.output_tokens_details.reasoning_tokens == 0
