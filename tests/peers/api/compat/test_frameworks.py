"""The OpenAI door driven by langchain-openai and litellm as their users drive it: answers equal
the openai package's, structured output parses into objects, tool calls make a round trip."""

import asyncio
import gc
import json
import warnings

import jsonschema
import pytest

from tests.peers.api.compat.common import COLORS, PROMPTS, City, chat, complete

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _their_leaks():
    """The frameworks leave sockets of their own behind (an event loop, with its self-pipe, that
    litellm or langchain never closes): closed here, their warning dropped, so that it does not
    surface in whatever test of this process the garbage collector next runs in."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.BaseEventLoop)]:
            if not loop.is_running() and not loop.is_closed():
                loop.close()
        gc.collect()


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
