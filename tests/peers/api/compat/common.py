"""What the compatibility tests share: prompts, tools and their schemas, and calls through the
openai package."""

import json

import httpx
import jsonschema
from pydantic import BaseModel, Field

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
