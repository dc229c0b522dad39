"""OpenAI's Responses API at a peer's door: POST /v1/responses (whole, or streamed as server-sent
events), GET and DELETE /v1/responses/{id}. A request becomes a chat request (response_chat.py)
that the door answers as any chat (admission, runs, grammar, tools, reasoning); its events are
shaped as a Response (response_events.py) and kept for previous_response_id (response_store.py)."""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import TypeAdapter
from starlette.background import BackgroundTask

from peers.api.events import Event
from peers.api.openai_routes import Answer, OpenAIDoor, unless_gone
from peers.api.response_chat import chat_request, renamed
from peers.api.response_events import ResponseBuilder, response_usage, sse_bytes
from peers.api.response_schema import Item, ResponsesRequest, parsed
from peers.api.response_store import ResponseStore
from peers.api.runs import first_events, usage
from peers.api.schema import ChatRequest
from peers.api.shapes import chat_logprobs
from peers.api.sse import KEEPALIVE, chained, with_keepalive
from peers.transport.errors import InvalidRequest, NotFound, SwarmError

log = logging.getLogger("layerswarm.api")
ITEMS = TypeAdapter(list[Item])
Keep = Callable[[dict], None]  # keeps a finished response's body (and its conversation)


def router(door: OpenAIDoor) -> APIRouter:
    """The Responses API's routes, answered by `door`."""
    responses = ResponsesDoor(door)
    api = APIRouter()
    api.add_api_route("/v1/responses", responses.create, methods=["POST"])
    api.add_api_route("/v1/responses/{response_id}", responses.retrieve, methods=["GET"])
    api.add_api_route("/v1/responses/{response_id}", responses.delete, methods=["DELETE"])
    return api


def echoed(req: ResponsesRequest, chat: ChatRequest) -> dict:
    """The request's parameters as a Response repeats them (sampling as it was applied: the
    model's own where the request named none)."""
    fmt = req.text.format if req.text and req.text.format else None
    choice = req.tool_choice
    return {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": chat.temperature,
        "top_p": chat.top_p,
        "tools": [t.model_dump() for t in req.tools or ()],
        "tool_choice": choice.model_dump()
        if choice is not None and not isinstance(choice, str)
        else choice or "auto",
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "parallel_tool_calls": chat.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
        "top_logprobs": req.top_logprobs,
        "background": False,
        "store": req.store is not False,
        "metadata": req.metadata or {},
        "truncation": "disabled",
        "user": req.user,
    }


async def drained(events: AsyncIterator[Event], builder: ResponseBuilder) -> None:
    """Every event of a whole answer, into its builder."""
    try:
        async for event in events:
            builder.of(event)
    finally:
        await events.aclose()


class ResponsesDoor:
    """The Responses API of one peer: its handlers, and the responses it keeps."""

    def __init__(self, door: OpenAIDoor):
        self.door = door
        self.store = ResponseStore()

    async def create(self, request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequest("the request body is not valid JSON") from None
        req = parsed(body)
        items = [*self.conversation(req.previous_response_id), *req.input_items()]
        chat = chat_request(req, items, self.door.node.tokenizer)
        rid = "resp_" + uuid.uuid4().hex

        def keep(body: dict) -> None:
            if req.store is not False:
                self.store.put(rid, body, [*items, *ITEMS.validate_python(body["output"])])

        try:
            return await self.door.chat_answer(
                chat, request, lambda answer: self.respond(answer, req, rid, keep)
            )
        except SwarmError as e:
            raise renamed(e) from None

    def conversation(self, rid: str | None) -> list[Item]:
        """The items of the kept response `rid` (none without one)."""
        if rid is None:
            return []
        kept = self.store.get(rid)
        if kept is None:
            raise NotFound(
                f"no response {rid!r} is kept here (never kept, store: false, deleted, or older than an hour)",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return list(kept.items)

    async def respond(self, answer: Answer, req: ResponsesRequest, rid: str, keep: Keep) -> Response | dict:
        """The answer as a Response: whole, or streamed."""
        top = answer.ask.logprobs  # (None: not asked)
        scored = partial(chat_logprobs, self.door.node.tokenizer, top=top) if top is not None else None
        builder = ResponseBuilder(
            rid, self.door.node.served_model, echoed(req, answer.req), list(answer.ask.tools), scored
        )
        if req.stream:
            return await self.streamed(answer, builder, keep)
        task = asyncio.ensure_future(drained(answer.events, builder))
        if not await unless_gone(task, answer.request):
            answer.release()
            return Response(status_code=499)  # nobody reads it
        task.result()  # (a failure is released by the door, or queued again)
        answer.release()
        builder.closing(response_usage(usage(answer.runs), builder.reasoning_tokens))
        body = builder.body()
        keep(body)
        return JSONResponse(body, headers=answer.headers)

    async def streamed(self, answer: Answer, builder: ResponseBuilder, keep: Keep) -> Response:
        """The answer as server-sent events; its first step is computed before the response
        starts, so that a request that cannot start gets its real status."""
        priming = asyncio.ensure_future(first_events(answer.events))
        try:
            if not await unless_gone(priming, answer.request):
                answer.release()
                return Response(status_code=499)
            first = priming.result()
        except BaseException:
            await answer.events.aclose()
            raise
        return StreamingResponse(
            stream(first, answer, builder, keep, self.door.node.config.sse_keepalive_s),
            media_type="text/event-stream",
            headers=answer.headers,
            background=BackgroundTask(answer.release),
        )

    async def retrieve(self, response_id: str, request: Request) -> dict:
        no_query(request)
        kept = self.store.get(response_id)
        if kept is None:
            raise not_kept(response_id)
        return kept.body

    async def delete(self, response_id: str, request: Request) -> dict:
        no_query(request)
        if not self.store.delete(response_id):
            raise not_kept(response_id)
        return {"id": response_id, "object": "response", "deleted": True}


def not_kept(rid: str) -> NotFound:
    return NotFound(
        f"no response {rid!r} is kept here (never kept, store: false, deleted, or older than an hour)",
        param="response_id",
        code="not_found",
    )


def no_query(request: Request) -> None:
    """GET and DELETE take no query parameters here (stream, include, starting_after: refused)."""
    for name in request.query_params:
        raise InvalidRequest(f"this server does not implement the query parameter {name!r} here", param=name)


async def stream(
    first: list[Event], answer: Answer, builder: ResponseBuilder, keep: Keep, keepalive_s: float
) -> AsyncIterator[bytes]:
    """The events of a streamed response, a keep-alive comment after each `keepalive_s` without
    one; an error once the stream has started is an error event."""
    ticking = with_keepalive(chained(first, answer.events), keepalive_s)
    try:
        for event in builder.opening():
            yield sse_bytes(event)
        async for event in ticking:
            if event is None:
                yield KEEPALIVE
                continue
            for out in builder.of(event):
                yield sse_bytes(out)
        last = builder.closing(response_usage(usage(answer.runs), builder.reasoning_tokens))
        keep(builder.body())  # (before response.completed: a client may continue it at once)
        for out in last:
            yield sse_bytes(out)
    except SwarmError as e:
        yield sse_bytes(builder.error(renamed(e)))
    except Exception as e:
        log.exception("stream failed")
        yield sse_bytes(builder.error(SwarmError(f"internal error: {type(e).__name__}: {e}")))
    finally:
        await ticking.aclose()
        await answer.events.aclose()
        answer.release()
