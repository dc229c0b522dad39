"""A streamed answer as server-sent events: each choice's chunks from the run events (tool calls
held back and sent whole at the end), a keep-alive comment while nothing comes, the error as an
event once the stream has started, and `data: [DONE]` last."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator

from peers.api.events import Delta, Event, Finish, Scored
from peers.api.shapes import Shape
from peers.api.tools import CallFilter, openai_calls, split_calls
from peers.transport.errors import SwarmError

log = logging.getLogger("layerswarm.api")

KEEPALIVE = b": keep-alive\n\n"


def event_bytes(data: dict | str) -> bytes:
    """One server-sent event carrying `data` (JSON, or a bare string such as [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


class Chunks:
    """The chunks of `count` streamed choices, event by event: chat streams open with the
    assistant's role, completions with their echo; text offsets count on for text logprobs.
    `prompts`: each choice's prompt ids, given once (return_token_ids: a chat's in the stream's
    first chunk, a completion's in each choice's first). `usage`: the usage so far, put on every
    chunk (vLLM's continuous_usage_stats)."""

    def __init__(
        self,
        shape: Shape,
        count: int,
        echo: list[str],
        prompts: list[list[int]] | None = None,
        usage: Callable[[], dict] | None = None,
    ):
        self.shape, self.count, self.echo, self.usage = shape, count, echo, usage
        self.filters = [CallFilter() for _ in range(count)] if shape.tools else []
        self.offsets = [len(e) for e in echo] or [0] * count  # completions' text_offset
        self.prompts: dict[int, list[int]] = dict(enumerate(prompts or ()))
        if shape.chat:  # (one prompt: on the stream's first chunk only)
            self.prompts = {i: p for i, p in self.prompts.items() if i == 0}

    def chunk(self, i: int, delta: dict | str, finish: str | None = None, logprobs=None, ids=()) -> dict:
        """Choice i's chunk, its prompt's ids with the first of them (return_token_ids)."""
        prompt = self.prompts.pop(i, None) if self.shape.token_ids else None
        chunk = self.shape.chunk(i, delta, finish, logprobs, ids, prompt)
        return chunk if self.usage is None else chunk | {"usage": self.usage()}

    def opening(self) -> Iterator[dict]:
        for i in range(self.count):
            if self.shape.chat:
                yield self.chunk(i, {"role": "assistant", "content": ""})
                if self.echo:  # (vLLM's echo: the last message's text)
                    yield self.chunk(i, {"content": self.echo[i]})
            elif self.echo and self.shape.logprobs is None:  # (with logprobs: once the prompt is scored)
                yield self.chunk(i, self.echo[i])

    def of(self, event: Event) -> Iterator[dict]:
        """The chunks that `event` brings (none for a step's end)."""
        if isinstance(event, Delta):
            yield from self._delta(event)
        elif isinstance(event, Finish):
            yield from self._finish(event)
        elif isinstance(event, Scored) and self.echo and self.shape.logprobs is not None:
            logprobs = self.shape.echo_logprobs(event.prompt_ids, event.positions)
            yield self.chunk(event.index, self.echo[event.index], logprobs=logprobs)

    def _delta(self, event: Delta) -> Iterator[dict]:
        shape, i = self.shape, event.index
        text = self.filters[i].push(event.text) if self.filters else event.text
        logprobs = shape.delta_logprobs(event.tokens, self.offsets[i])
        if logprobs:
            self.offsets[i] += sum(len(shape.tokenizer.token_text(t.token)) for t in event.tokens)
        ids = [t.token for t in event.tokens] if shape.token_ids else []
        if not (text or logprobs or event.reasoning or ids):
            return
        if not shape.chat:
            yield self.chunk(i, text, logprobs=logprobs, ids=ids)
            return
        delta = {"reasoning_content": event.reasoning} if event.reasoning else {}
        if text or not event.reasoning:
            delta["content"] = text
        yield self.chunk(i, delta, logprobs=logprobs, ids=ids)

    def _finish(self, event: Finish) -> Iterator[dict]:
        shape, i, reason = self.shape, event.index, event.reason
        if self.filters:
            held = self.filters[i].finish()
            rest, calls = split_calls(held, shape.tools)
            if calls:
                if rest:
                    yield self.chunk(i, {"content": rest})
                deltas = [{"index": k, **call} for k, call in enumerate(openai_calls(calls))]
                yield self.chunk(i, {"tool_calls": deltas})
                reason = "tool_calls" if reason != "length" else reason
            elif rest:  # (a call cut off at the end is held back, and dropped)
                yield self.chunk(i, {"content": rest})
        yield self.chunk(i, {} if shape.chat else "", reason, ids=event.tokens)


async def sse(
    first: list[Event],
    events: AsyncIterator[Event],
    chunks: Chunks,
    usage: Callable[[], dict | None],
    release: Callable[[], None],
    keepalive_s: float,
) -> AsyncIterator[bytes]:
    """The stream: `first` (events already taken), then the rest of `events`, with a keep-alive
    comment after each `keepalive_s` without one (a failover may take seconds); `usage()` is the
    final usage chunk's, or None for none; `release()` once the stream ends, however it ends."""
    ticking = with_keepalive(chained(first, events), keepalive_s)
    try:
        for chunk in chunks.opening():
            yield event_bytes(chunk)
        async for event in ticking:
            if event is None:
                yield KEEPALIVE
                continue
            for chunk in chunks.of(event):
                yield event_bytes(chunk)
        final = usage()
        if final is not None:
            yield event_bytes(chunks.shape.usage_chunk(final))
    except SwarmError as e:  # the stream has started: the error travels as an event
        yield event_bytes(e.to_json())
    except Exception as e:
        log.exception("stream failed")
        yield event_bytes(SwarmError(f"internal error: {type(e).__name__}: {e}").to_json())
    finally:
        await ticking.aclose()
        await events.aclose()
        release()
    yield event_bytes("[DONE]")


async def chained(first: list[Event], events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """`first` (events already taken), then the rest of `events`."""
    for event in first:
        yield event
    async for event in events:
        yield event


async def with_keepalive(events: AsyncIterator, every_s: float) -> AsyncIterator:
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
