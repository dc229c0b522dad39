"""Streamed answers without a swarm: the chunks each event brings, tool calls held back and sent
whole, keep-alive comments, an error as an event, `[DONE]` last and the request released once."""

import asyncio
import json

from inference.sampling import PositionScore
from peers.api.events import Delta, Finish, Scored, Stepped
from peers.api.schema import Tool
from peers.api.shapes import Shape
from peers.api.sse import KEEPALIVE, Chunks, sse
from peers.entry.generation import Token
from peers.transport.errors import Overloaded
from tests.peers.api.fakes import CharTokenizer

ADD = Tool.model_validate({"type": "function", "function": {"name": "add"}})


def shape(chat: bool, logprobs: int | None = None, tools: list | None = None) -> Shape:
    return Shape("rid-1", "m", chat, CharTokenizer(), logprobs, tools or [])


def tokens(text: str) -> tuple[Token, ...]:
    return tuple(Token(ord(c), -0.25, ((ord(c), -0.25),)) for c in text)


async def send(events, chunks, usage=None, keepalive_s=5.0, first=()):
    released = []

    async def stream():
        for e in events:
            if isinstance(e, float):
                await asyncio.sleep(e)
            elif isinstance(e, Exception):
                raise e
            else:
                yield e

    out = [
        b
        async for b in sse(
            list(first), stream(), chunks, lambda: usage, lambda: released.append(1), keepalive_s
        )
    ]
    return out, released


def data(frames: list[bytes]) -> list:
    assert all(f.endswith(b"\n\n") for f in frames), frames
    return [f for f in frames if f != KEEPALIVE]


def parsed(frames: list[bytes]) -> list:
    out = []
    for f in data(frames):
        assert f.startswith(b"data: "), f
        body = f[len(b"data: ") : -2].decode()
        out.append(body if body == "[DONE]" else json.loads(body))
    return out


def test_a_chat_stream_opens_with_the_role_and_ends_with_usage_and_done():
    s = shape(chat=True)
    events = [Delta(0, "Hi", tokens("Hi")), Stepped(), Finish(0, "stop")]
    frames, released = asyncio.run(send(events, Chunks(s, 1, []), usage={"total_tokens": 3}))
    got = parsed(frames)
    assert [c["choices"][0]["delta"] for c in got[:3]] == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {},
    ]
    assert got[2]["choices"][0]["finish_reason"] == "stop"
    assert got[3]["choices"] == [] and got[3]["usage"] == {"total_tokens": 3}
    assert got[-1] == "[DONE]" and released == [1]
    assert {c["id"] for c in got[:-1]} == {"rid-1"} and got[0]["object"] == "chat.completion.chunk"


def test_a_completion_stream_echoes_and_counts_text_offsets():
    s = shape(chat=False, logprobs=1)
    prompt = Scored(0, tuple(map(ord, "Q: ")), (PositionScore(-1.0, 2, ((7, -0.5),)), PositionScore(-0.5, 1)))
    events = [prompt, Delta(0, "ab", tokens("ab")), Delta(0, "c", tokens("c")), Finish(0, "length")]
    got = parsed(asyncio.run(send(events, Chunks(s, 1, ["Q: "])))[0])
    assert [c["choices"][0]["text"] for c in got[:-1]] == ["Q: ", "ab", "c", ""]
    echoed = got[0]["choices"][0]["logprobs"]  # (the prompt's, once it was scored)
    assert echoed["tokens"] == ["Q", ":", " "] and echoed["token_logprobs"] == [None, -1.0, -0.5]
    assert echoed["top_logprobs"] == [None, {chr(7): -0.5, ":": -1.0}, {" ": -0.5}]
    assert echoed["text_offset"] == [0, 1, 2]
    assert got[1]["choices"][0]["logprobs"]["text_offset"] == [3, 4]
    assert got[2]["choices"][0]["logprobs"]["text_offset"] == [5]
    assert got[3]["choices"][0]["finish_reason"] == "length" and got[-1] == "[DONE]"


def test_tool_calls_are_held_back_and_sent_whole():
    s = shape(chat=True, tools=[ADD])
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    events = [Delta(0, "Sure. " + call[:5], ()), Delta(0, call[5:], ()), Finish(0, "stop")]
    got = parsed(asyncio.run(send(events, Chunks(s, 1, [])))[0])
    deltas = [c["choices"][0]["delta"] for c in got[:-1]]
    assert deltas[1] == {"content": "Sure. "}
    (sent,) = deltas[2]["tool_calls"]
    assert sent["index"] == 0 and sent["function"] == {"name": "add", "arguments": '{"a": 1}'}
    assert got[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_keepalive_comments_while_nothing_comes():
    s = shape(chat=False)
    frames, _ = asyncio.run(send([0.2, Finish(0, "stop")], Chunks(s, 1, []), keepalive_s=0.05))
    assert KEEPALIVE in frames
    assert frames.index(KEEPALIVE) < len(frames) - 2  # before the finish chunk and [DONE]


def test_an_error_after_the_start_travels_as_an_event():
    s = shape(chat=True)
    events = [Delta(0, "x", ()), Overloaded("too busy", 1.0)]
    got = parsed(asyncio.run(send(events, Chunks(s, 1, []), first=[Stepped()]))[0])
    assert got[-2]["error"]["message"] == "too busy" and got[-1] == "[DONE]"
    events = [RuntimeError("boom")]
    frames, released = asyncio.run(send(events, Chunks(s, 1, [])))
    assert parsed(frames)[-2]["error"]["message"] == "internal error: RuntimeError: boom" and released == [1]
