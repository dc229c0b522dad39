"""A forced tool call (`tool_choice` required or named) cut off by max_tokens, at the OpenAI door
of a peer of the tiny Llama (in process, over httpx): its markup never reaches the content,
streamed or not; the answer says finish_reason "length" and carries no tool_calls."""

import asyncio
import json

import pytest

from tests.peers.api.test_grammar_door import ask_door

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CHOICES = {"required": "required", "named": {"type": "function", "function": {"name": "get_weather"}}}


@pytest.fixture(scope="module")
def answers(tiny_llama) -> dict:
    cases = [(name, stream, n) for name in CHOICES for stream in (False, True) for n in (1, 5, 8)]
    bodies = [
        {
            "model": "llama",
            "messages": [{"role": "user", "content": "the weather?"}],
            "max_tokens": n,
            "temperature": 0,
            "tools": TOOLS,
            "tool_choice": CHOICES[name],
            "stream": stream,
        }
        for name, stream, n in cases
    ]
    return dict(zip(cases, asyncio.run(ask_door(tiny_llama, bodies)), strict=True))


@pytest.mark.parametrize("name", list(CHOICES))
@pytest.mark.parametrize("n", [1, 5, 8])
def test_a_forced_call_cut_off_leaves_no_markup(answers, name, n):
    plain = answers[name, False, n]
    assert plain.status_code == 200, plain.text
    choice = plain.json()["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"], choice
    assert "<" not in (choice["message"]["content"] or ""), choice
    streamed = answers[name, True, n]
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    deltas = [e["choices"][0] for e in events if e["choices"]]
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    assert "<" not in content and not any("tool_calls" in d["delta"] for d in deltas), deltas
    assert deltas[-1]["finish_reason"] == "length"
