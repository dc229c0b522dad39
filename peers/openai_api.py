"""The OpenAI-compatible API every peer serves: /v1/models, /v1/chat/completions, /v1/completions,
streaming as server-sent events."""

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from .entry import banned_now, current_route, generate
from .errors import InvalidRequest, ModelNotServed, SwarmError, SwarmUnavailable
from .node import PeerNode
from .protocol import Sampling
from .routing import NoRouteError
from .textstream import TextStream

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
    n: int = 1
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

    @api.get("/v1/models")
    async def models() -> dict:
        card = {"id": node.model_id, "object": "model", "created": 0, "owned_by": "layerswarm"}
        return {"object": "list", "data": [card]}

    @api.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
            for m in req.messages
        ]
        try:
            prompt_ids = node.tokenizer.encode_chat(messages)
        except Exception as e:  # the chat template refused these messages (e.g. roles not alternating)
            raise InvalidRequest(
                f"the model's chat template rejected the messages: {e}", param="messages"
            ) from e
        return await _complete(node, req, prompt_ids, chat=True)

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if not req.prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return await _complete(node, req, node.tokenizer.encode(req.prompt), chat=False)

    return api


def _check(node: PeerNode, req: _Request, prompt_ids: list[int]) -> int:
    """Validate what pydantic cannot; returns max_tokens."""
    if req.model != node.model_id:
        raise ModelNotServed(req.model, node.model_id)
    if req.n != 1:
        raise InvalidRequest(f"n must be 1 (got {req.n}); send several requests instead", param="n")
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


async def _complete(node: PeerNode, req: _Request, prompt_ids: list[int], chat: bool):
    max_tokens = _check(node, req, prompt_ids)
    if node.active_requests >= node.config.max_queue:
        raise SwarmUnavailable(f"this peer already holds {node.active_requests} requests (max_queue)")
    node.active_requests += 1  # counted from now, released once when the response is done
    release = _once(lambda: setattr(node, "active_requests", node.active_requests - 1))
    try:
        return await _respond(node, req, prompt_ids, max_tokens, chat, release)
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
    node: PeerNode, req: _Request, prompt_ids: list[int], max_tokens: int, chat: bool, release
):
    try:  # a missing route is a 503 before anything is streamed
        current_route(node, "probe", banned_now(node))
    except NoRouteError as e:
        raise SwarmUnavailable(str(e)) from None
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sampling = Sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed)
    stop_ids = frozenset() if req.ignore_eos else node.tokenizer.eos_token_ids
    run = _Run(node, prompt_ids, max_tokens, sampling, TextStream(node.tokenizer, stops), stop_ids)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    shape = _ChatShape(rid, node.model_id) if chat else _TextShape(rid, node.model_id)
    if req.stream:
        usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _sse(run, shape, usage, release),
            media_type="text/event-stream",
            background=BackgroundTask(release),
        )
    try:
        text = "".join([delta async for delta in run.deltas()])
    finally:
        release()
    return shape.whole(text, run.finish_reason, run.usage())


class _Run:
    """One generation: token stream -> text deltas, finish reason and usage."""

    def __init__(self, node: PeerNode, prompt_ids, max_tokens, sampling, text: TextStream, stop_ids):
        self.node, self.prompt_ids, self.max_tokens = node, prompt_ids, max_tokens
        self.sampling, self.text, self.stop_ids = sampling, text, stop_ids
        self.finish_reason = "length"
        self.completion_tokens = 0

    async def deltas(self) -> AsyncIterator[str]:
        node = self.node
        gen = generate(node, self.prompt_ids, self.max_tokens, self.sampling, self.stop_ids)
        try:
            async for tok in gen:
                self.completion_tokens += 1
                if tok.token in self.stop_ids:
                    self.finish_reason = "stop"
                    break
                delta = self.text.push(tok.token)
                if delta:
                    yield delta
                if self.text.stopped:
                    self.finish_reason = "stop"
                    break
            rest = self.text.finish()
            if rest:
                yield rest
        finally:
            await gen.aclose()

    def usage(self) -> dict:
        p, c = len(self.prompt_ids), self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class _ChatShape:
    def __init__(self, rid: str, model: str):
        self.rid, self.model, self.created = rid, model, int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        return {**self._base("chat.completion"), "choices": [choice], "usage": usage}

    def chunk(self, delta: str | None, finish: str | None, first: bool = False) -> dict:
        d = (
            {"role": "assistant", "content": ""}
            if first
            else ({"content": delta} if delta is not None else {})
        )
        choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage}


class _TextShape(_ChatShape):
    def whole(self, text: str, finish: str, usage: dict) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, delta: str | None, finish: str | None, first: bool = False) -> dict:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base("text_completion"), "choices": [], "usage": usage}


def _event(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _sse(run: _Run, shape: _ChatShape, include_usage: bool, release) -> AsyncIterator[bytes]:
    try:
        if not isinstance(shape, _TextShape):  # chat streams open with the assistant's role
            yield _event(shape.chunk(None, None, first=True))
        async for delta in run.deltas():
            yield _event(shape.chunk(delta, None))
        yield _event(shape.chunk(None, run.finish_reason))
        if include_usage:
            yield _event(shape.usage_chunk(run.usage()))
    except SwarmError as e:  # the stream has started: the error travels as an event
        yield _event(e.to_json())
    except Exception as e:
        log.exception("stream failed")
        yield _event(SwarmError(f"internal error: {type(e).__name__}: {e}").to_json())
    finally:
        release()
    yield _event("[DONE]")
