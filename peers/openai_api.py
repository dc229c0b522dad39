"""The OpenAI-compatible API every peer serves: /v1/models, /v1/chat/completions, /v1/completions,
streaming as server-sent events."""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from .consensus import MAX_CONSENSUS, checked_generate, verified_generate
from .entry import RETRY_AFTER_S, banned_now, current_route, generate
from .errors import InvalidRequest, ModelNotServed, Overloaded, SwarmError, SwarmUnavailable
from .logs import RUN_KEY
from .metrics import TokenClock
from .node import PeerNode
from .protocol import Sampling
from .routing import NoRouteError
from .textstream import TextStream

MAX_N = 16  # sequences per request
MAX_CHARS_PER_TOKEN = 64  # no token of a real vocabulary is longer: longer prompts cannot fit
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there

log = logging.getLogger("layerswarm.api")

DEFAULT_MAX_TOKENS = 1024  # when a request names none: this, or what the context has left


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # an extension, as in vLLM
    ignore_eos: bool = False  # an extension, as in vLLM: generate max_tokens whatever comes
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    consensus: int = Field(1, ge=1, le=MAX_CONSENSUS)  # an extension: k routes, the majority decides
    speculative: bool = True  # an extension: false turns off drafting for this request
    stream: bool = False
    stream_options: dict | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str


def _text_of(content: str | list[dict]) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest("only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def router(node: PeerNode) -> APIRouter:
    api = APIRouter()
    tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")  # off the event loop

    @api.get("/v1/models")
    async def models() -> dict:
        card = {"id": node.model_id, "object": "model", "created": 0, "owned_by": "layerswarm"}
        return {"object": "list", "data": [card]}

    @api.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
            for m in req.messages
        ]

        _check_prompt_size(node, sum(len(m["content"]) for m in messages), "messages")

        async def prompt_ids() -> list[int]:
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(tokenize, node.tokenizer.encode_chat, messages)
            except Exception as e:  # the chat template refused these messages (e.g. roles not alternating)
                raise InvalidRequest(
                    f"the model's chat template rejected the messages: {e}", param="messages"
                ) from e

        return await _complete(node, req, prompt_ids, True, request)

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if not req.prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        _check_prompt_size(node, len(req.prompt), "prompt")

        async def prompt_ids() -> list[int]:
            return await asyncio.get_running_loop().run_in_executor(
                tokenize, node.tokenizer.encode, req.prompt
            )

        return await _complete(node, req, prompt_ids, False, request)

    return api


def _check_prompt_size(node: PeerNode, chars: int, param: str) -> None:
    """Before tokenizing: a prompt that could not fit the context however it tokenizes is
    refused at once (tokenizing megabytes takes seconds and gigabytes)."""
    limit = node.context_length * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise InvalidRequest(
            f"the prompt has {chars} characters; this model's context of {node.context_length} tokens "
            f"holds at most {limit}",
            param=param,
            code="context_length_exceeded",
        )


def _admit(node: PeerNode, req: "_Request") -> None:
    """Before any work: the model, and room for one more request at this entry (so that no more
    than --max-requests prompts wait for the tokenizer either)."""
    if req.model != node.model_id:
        raise ModelNotServed(req.model, node.model_id)
    if node.active_requests >= node.config.max_requests:
        raise Overloaded(
            f"this peer already serves {node.active_requests} requests at once (--max-requests "
            f"{node.config.max_requests}); retry in {RETRY_AFTER_S} s or use another peer",
            RETRY_AFTER_S,
        )
    if node.stopping or node.table.me.state in ("leaving", "dead"):
        raise SwarmUnavailable("this peer is shutting down; send the request to another peer")


def _check(node: PeerNode, req: "_Request", prompt_ids: list[int]) -> int:
    """Validate what pydantic cannot; returns max_tokens."""
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > 4:
        raise InvalidRequest(f"at most 4 stop sequences, got {len(stops)}", param="stop")
    room = node.context_length - len(prompt_ids)
    asked = req.max_completion_tokens or req.max_tokens
    if room < 1 or (asked is not None and asked > room):
        raise InvalidRequest(
            f"this model's maximum context length is {node.context_length} tokens; the prompt has "
            f"{len(prompt_ids)} tokens and {asked or 1} more were asked for",
            param="messages" if isinstance(req, ChatRequest) else "prompt",
            code="context_length_exceeded",
        )
    return asked or min(DEFAULT_MAX_TOKENS, room)


async def _complete(node: PeerNode, req: "_Request", prompt_ids, chat: bool, request: Request):
    """Admit the request, tokenize its prompt (`prompt_ids()`), then answer it."""
    _admit(node, req)
    node.active_requests += 1  # counted from admission, released once when the response is done
    release = _once(lambda: setattr(node, "active_requests", node.active_requests - 1))
    try:
        ids = await prompt_ids()
        max_tokens = _check(node, req, ids)
        return await _respond(node, req, ids, max_tokens, chat, release, request)
    except BaseException:
        release()
        raise


def _once(fn):
    done = []

    def call():
        if not done:
            done.append(True)
            fn()

    return call


async def _respond(
    node: PeerNode,
    req: "_Request",
    prompt_ids: list[int],
    max_tokens: int,
    chat: bool,
    release,
    request: Request,
):
    try:  # a missing route is a 503 before anything is computed
        current_route(node, "probe", banned_now(node))
    except NoRouteError as e:
        raise SwarmUnavailable(str(e)) from None
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sampling = Sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed)
    stop_ids = frozenset() if req.ignore_eos else node.tokenizer.eos_token_ids
    verify = req.consensus == 1 and node.should_verify()
    speculative = req.speculative and node.config.speculative
    run = _Run(
        node, prompt_ids, max_tokens, sampling, stops, stop_ids, req.n, req.consensus, verify, speculative
    )
    request.scope[RUN_KEY] = run  # its token count goes into the request's log line
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    shape = _ChatShape(rid, node.model_id) if chat else _TextShape(rid, node.model_id)
    events = run.events()
    if req.stream:
        # The first token is computed before the response starts, so that a request that
        # cannot start (no route, no room) gets its real status instead of 200 and an error.
        priming = asyncio.ensure_future(_first_events(events))
        try:
            if not await unless_gone(priming, request):
                release()
                return Response(status_code=499)  # nobody reads it
            first = priming.result()
        except BaseException:
            await events.aclose()
            raise
        usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _sse(first, events, run, shape, usage, release),
            media_type="text/event-stream",
            background=BackgroundTask(release),
        )
    task = asyncio.ensure_future(_collect(events, req.n))
    try:
        if not await unless_gone(task, request):
            return Response(status_code=499)  # nobody reads it
        texts = task.result()
    finally:
        release()
    return shape.whole(texts, run.finish, run.usage())


async def unless_gone(task: asyncio.Future, request: Request, what: str = "generation") -> bool:
    """Wait for `task`; if the client hangs up first, cancel it (a generation stops within a
    step and its sessions close; a hop's queued work is dropped) and return False."""
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                log.info("client went away; %s stopped", what)
                return False
        return True
    finally:
        if not task.done():  # this handler itself was cancelled
            task.cancel()


async def _first_events(events: AsyncIterator) -> list:
    """The events up to and including the first one that follows a generated token (the
    generator stays open for the rest)."""
    first = []
    while not first or first[-1][0] != "token":
        try:
            first.append(await anext(events))
        except StopAsyncIteration:
            break
    return first


async def _collect(events: AsyncIterator, n: int) -> list[str]:
    texts = [[] for _ in range(n)]
    async for kind, index, delta, _ in events:
        if kind == "delta":
            texts[index].append(delta)
    return ["".join(t) for t in texts]


class _Run:
    """One generation of n sequences: tokens -> text deltas, finish reasons and usage."""

    def __init__(
        self,
        node: PeerNode,
        prompt_ids,
        max_tokens,
        sampling,
        stops,
        stop_ids,
        n: int,
        routes: int = 1,
        verify: bool = False,
        speculative: bool = False,
    ):
        """`routes` > 1: that many whole routes, the majority deciding (the consensus field);
        `verify`: every replicated hop recomputed by a shadow (--verify-rate); `speculative`:
        drafted tokens checked by the chain where that applies (one sequence, unchecked)."""
        self.node, self.prompt_ids, self.max_tokens = node, prompt_ids, max_tokens
        self.routes, self.verify, self.speculative = routes, verify, speculative
        self.sampling, self.stop_ids, self.n = sampling, stop_ids, n
        self.texts = [TextStream(node.tokenizer, stops) for _ in range(n)]
        self.finish = ["length"] * n
        self.done = [False] * n
        self.completion_tokens = 0
        self.clock = TokenClock(node.metrics, len(prompt_ids))

    async def events(self) -> AsyncIterator[tuple[str, int, str | None, str | None]]:
        """("token", -1, None, None) after each step, ("delta", i, text, None) and
        ("finish", i, None, reason) per sequence i."""
        args = (self.node, self.prompt_ids, self.max_tokens, self.sampling, self.stop_ids, self.n)
        if self.verify:
            gen = verified_generate(*args)
        elif self.routes > 1:
            gen = checked_generate(*args, routes=self.routes)
        else:
            gen = generate(*args, speculative=self.speculative)
        try:
            async for tokens in gen:
                counted = self.completion_tokens
                for i, tok in enumerate(tokens):
                    if self.done[i]:
                        continue
                    self.completion_tokens += 1
                    if tok.token in self.stop_ids:
                        for event in self._end(i, "stop"):
                            yield event
                        continue
                    delta = self.texts[i].push(tok.token)
                    if delta:
                        yield ("delta", i, delta, None)
                    if self.texts[i].stopped:
                        for event in self._end(i, "stop"):
                            yield event
                self.clock.step(self.completion_tokens - counted)
                yield ("token", -1, None, None)
                if all(self.done):
                    break
            for i in range(self.n):
                if not self.done[i]:
                    for event in self._end(i, "length"):
                        yield event
        finally:
            await gen.aclose()

    def _end(self, i: int, reason: str):
        self.done[i], self.finish[i] = True, reason
        rest = self.texts[i].finish()
        if rest:
            yield ("delta", i, rest, None)
        yield ("finish", i, None, reason)

    def usage(self) -> dict:
        p, c = len(self.prompt_ids), self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class _ChatShape:
    def __init__(self, rid: str, model: str):
        self.rid, self.model, self.created = rid, model, int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def whole(self, texts: list[str], finish: list[str], usage: dict) -> dict:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish[i],
            }
            for i, text in enumerate(texts)
        ]
        return {**self._base("chat.completion"), "choices": choices, "usage": usage}

    def chunk(self, index: int, delta: str | None, finish: str | None, first: bool = False) -> dict:
        d = (
            {"role": "assistant", "content": ""}
            if first
            else ({"content": delta} if delta is not None else {})
        )
        choice = {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage}


class _TextShape(_ChatShape):
    def whole(self, texts: list[str], finish: list[str], usage: dict) -> dict:
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish[i]}
            for i, text in enumerate(texts)
        ]
        return {**self._base("text_completion"), "choices": choices, "usage": usage}

    def chunk(self, index: int, delta: str | None, finish: str | None, first: bool = False) -> dict:
        choice = {"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base("text_completion"), "choices": [], "usage": usage}


def _event(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _sse(
    first: list, events: AsyncIterator, run: _Run, shape: _ChatShape, include_usage: bool, release
):
    async def all_events():
        for event in first:
            yield event
        async for event in events:
            yield event

    try:
        if not isinstance(shape, _TextShape):  # chat streams open with the assistant's role
            for i in range(run.n):
                yield _event(shape.chunk(i, None, None, first=True))
        async for kind, index, delta, finish in all_events():
            if kind == "delta":
                yield _event(shape.chunk(index, delta, None))
            elif kind == "finish":
                yield _event(shape.chunk(index, None, finish))
        if include_usage:
            yield _event(shape.usage_chunk(run.usage()))
    except SwarmError as e:  # the stream has started: the error travels as an event
        yield _event(e.to_json())
    except Exception as e:
        log.exception("stream failed")
        yield _event(SwarmError(f"internal error: {type(e).__name__}: {e}").to_json())
    finally:
        await events.aclose()
        release()
    yield _event("[DONE]")
