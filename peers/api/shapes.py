"""The OpenAI response shapes: whole chat and text completions, their streamed chunks as
server-sent events (with keep-alive comments while nothing comes), logprobs in both endpoints'
forms, and tool calls read out of the text."""

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from peers.api.tools import CallFilter, openai_calls, split_calls
from peers.entry.generation import Token
from peers.transport.errors import SwarmError

log = logging.getLogger("layerswarm.api")


@dataclass
class Choice:
    """One choice of a whole (not streamed) answer."""

    index: int
    text: list[str] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    finish: str = "length"
    echo: str = ""


def fingerprint(model: str) -> str:
    """system_fingerprint: the model and the server's version."""
    try:
        release = version("layerswarm")
    except PackageNotFoundError:
        release = "unknown"
    return "fp_" + hashlib.sha256(f"{model}|{release}".encode()).hexdigest()[:10]


class Shape:
    """The responses of one request (chat or text completion)."""

    def __init__(self, rid: str, model: str, chat: bool, tokenizer, logprobs: int | None, tools: list):
        self.rid, self.model, self.chat, self.tokenizer = rid, model, chat, tokenizer
        self.logprobs, self.tools = logprobs, tools
        self.created = int(time.time())
        self.fingerprint = fingerprint(model)

    def _base(self, obj: str) -> dict:
        return {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    # --- whole answers
    def whole(self, choices: list[Choice], usage: dict) -> dict:
        out = []
        for i, c in enumerate(choices):
            text = "".join(c.text)
            if self.chat:
                message: dict = {"role": "assistant", "content": text}
                finish = c.finish
                if self.tools:
                    content, calls = split_calls(text, self.tools)
                    if calls:
                        message = {"role": "assistant", "content": content, "tool_calls": openai_calls(calls)}
                        finish = "tool_calls" if finish != "length" else finish  # cut off: it says so
                lp = {"content": self._chat_logprobs(c.tokens)} if self.logprobs is not None else None
                out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
            else:
                lp = self._text_logprobs(c.tokens, len(c.echo)) if self.logprobs is not None else None
                out.append({"index": i, "text": c.echo + text, "logprobs": lp, "finish_reason": c.finish})
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._base(obj), "choices": out, "usage": usage}

    # --- streamed chunks
    def chunk(self, index: int, delta: dict | str, finish: str | None = None, logprobs=None) -> dict:
        if self.chat:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage}

    def delta_logprobs(self, tokens: list[Token], offset: int):
        if self.logprobs is None:
            return None
        if self.chat:
            return {"content": self._chat_logprobs(tokens)}
        return self._text_logprobs(tokens, offset)

    # --- logprobs
    def _chat_logprobs(self, tokens: list[Token]) -> list[dict]:
        def entry(token: int, logprob: float) -> dict:
            text = self.tokenizer.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(a, lp) for a, lp in t.top[: self.logprobs]]}
            for t in tokens
        ]

    def _text_logprobs(self, tokens: list[Token], offset: int) -> dict:
        texts = [self.tokenizer.token_text(t.token) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        top = (
            [{self.tokenizer.token_text(a): lp for a, lp in t.top[: self.logprobs]} for t in tokens]
            if self.logprobs
            else None
        )
        return {
            "tokens": texts,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": top,
            "text_offset": offsets,
        }


def _event(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


async def sse(
    first: list,
    events: AsyncIterator,
    shape: Shape,
    count: int,
    echo: list[str],
    usage,
    release,
    keepalive_s: float,
) -> AsyncIterator[bytes]:
    """The stream of `count` choices: `first` (events already taken), then the rest of
    `events`, with a keep-alive comment after each `keepalive_s` without one (a failover may
    take seconds); `usage()` is the final usage chunk's, or None for none."""

    async def all_events():
        for event in first:
            yield event
        async for event in events:
            yield event

    filters = [CallFilter() for _ in range(count)] if shape.tools else []
    offsets = [len(e) for e in echo] or [0] * count  # completions' text_offset
    ticking = _with_keepalive(all_events(), keepalive_s)
    try:
        for i in range(count):
            if shape.chat:  # chat streams open with the assistant's role
                yield _event(shape.chunk(i, {"role": "assistant", "content": ""}))
            elif echo:
                yield _event(shape.chunk(i, echo[i]))
        async for event in ticking:
            if event is None:
                yield KEEPALIVE
                continue
            kind, index, a, b = event
            if kind == "delta":
                text = filters[index].push(a) if filters else a
                logprobs = shape.delta_logprobs(b, offsets[index])
                offsets[index] += sum(len(shape.tokenizer.token_text(t.token)) for t in b) if logprobs else 0
                if text or logprobs:
                    yield _event(
                        shape.chunk(index, {"content": text} if shape.chat else text, logprobs=logprobs)
                    )
            elif kind == "finish":
                reason = b
                if filters:
                    held = filters[index].finish()
                    rest, calls = split_calls(held, shape.tools)
                    if calls:
                        if rest:
                            yield _event(shape.chunk(index, {"content": rest}))
                        deltas = [{"index": k, **call} for k, call in enumerate(openai_calls(calls))]
                        yield _event(shape.chunk(index, {"tool_calls": deltas}))
                        reason = "tool_calls" if reason != "length" else reason
                    elif held:
                        yield _event(shape.chunk(index, {"content": held}))
                yield _event(shape.chunk(index, {} if shape.chat else "", reason))
        final = usage()
        if final is not None:
            yield _event(shape.usage_chunk(final))
    except SwarmError as e:  # the stream has started: the error travels as an event
        yield _event(e.to_json())
    except Exception as e:
        log.exception("stream failed")
        yield _event(SwarmError(f"internal error: {type(e).__name__}: {e}").to_json())
    finally:
        await ticking.aclose()
        await events.aclose()
        release()
    yield _event("[DONE]")


async def _with_keepalive(events: AsyncIterator, every_s: float) -> AsyncIterator:
    """The events, with None after each `every_s` seconds that brought none."""
    pending = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                event = task.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await events.aclose()
