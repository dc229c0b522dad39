"""The OpenAI-compatible completions every peer serves: /v1/chat/completions and /v1/completions,
with logprobs, sampling controls, structured output, tools, streaming as server-sent events. The
request bodies are in schema.py, what they ask for in asks.py, the response shapes in shapes.py."""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from inference.grammar import GrammarError
from peers.api.asks import (
    Ask,
    admit,
    chat_grammar,
    grammar_param,
    kv_need,
    max_tokens_for,
    own_grammar,
    run_specs,
    with_model_sampling,
)
from peers.api.door import ApiPeer
from peers.api.events import Event
from peers.api.prompts import (
    chat_echo,
    check_prompt_size,
    completion_prompts,
    prompt_chars,
    rendered_messages,
    template_kwargs,
    truncated,
)
from peers.api.reasoning import reasoning_of
from peers.api.runs import Run, Usage, best, collect, first_events, merged, usage
from peers.api.schema import ChatRequest, CompletionRequest, GenerationRequest
from peers.api.shapes import Shape
from peers.api.sse import Chunks, sse
from peers.entry.admission import Admission, Ticket
from peers.entry.generation import NoRoom, banned_now, current_route
from peers.entry.prefix import routing_key
from peers.entry.routes import unchecked_layers
from peers.swarm.routing import NoRouteError, coverage
from peers.transport.errors import InvalidRequest, SwarmUnavailable
from peers.transport.logs import RUN_KEY

__all__ = ["OpenAIDoor", "router", "unless_gone"]

UNCHECKED_HEADER = "x-layerswarm-unchecked-layers"  # spans of the route no other peer could recompute
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
# the tokenizer's tokens per character, measured on this text before any prompt of enough
# characters (MEASURED_CHARS) measures it: a request's KV is estimated before it is tokenized
SAMPLE_TEXT = (
    "The committee met on Tuesday to review the budget for the coming year. After a long "
    "discussion of costs, schedules and staffing, the members agreed to fund the new library, "
    "repair two bridges and hire eleven teachers; the vote was 7 to 2. "
) * 4
MEASURED_CHARS = 256
RATIO_WEIGHT = 0.2  # of each measured prompt in the tokens-per-character average

log = logging.getLogger("layerswarm.api")
T = TypeVar("T")
Respond = Callable[["Answer"], Awaitable[Response | dict]]  # an admitted request's answer, shaped


def router(door: "OpenAIDoor") -> APIRouter:
    """The completion routes of a peer's door."""
    api = APIRouter()
    api.add_api_route("/v1/chat/completions", door.chat, methods=["POST"])
    api.add_api_route("/v1/completions", door.completions, methods=["POST"])
    return api


@dataclass
class Answer:
    """An admitted request on its way out: its runs' events and how they are shaped."""

    req: GenerationRequest
    ask: Ask
    runs: list[Run]
    shape: Shape
    events: AsyncIterator[Event]
    release: Callable[[], None]  # once, when the response is done
    request: Request
    headers: dict[str, str]  # the response's own (UNCHECKED_HEADER)

    @property
    def prompts(self) -> int:
        return len(self.runs)


class OpenAIDoor:
    """The completion endpoints of one peer; `chat` and `completions` are the routes' handlers."""

    def __init__(self, node: ApiPeer):
        self.node = node
        # tokenizing runs off the event loop, one prompt at a time
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.tokens_per_char: float | None = None
        config = node.config
        # the queue in front of this entry's generation (/health shows it)
        self.admission = Admission(
            config.max_cache_tokens,
            config.scheduler.max_queue_wait_s,
            config.max_requests,
            config.max_waiting,
        )

    async def off_loop(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the tokenizing thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    async def chat(self, req: ChatRequest, request: Request):
        return await self.chat_answer(req, request, self.respond)

    async def chat_answer(self, req: ChatRequest, request: Request, respond: Respond):
        """A chat request's answer as `respond` shapes it (the Responses API shapes its own)."""
        node = self.node
        req = with_model_sampling(node, req)
        tools = list(req.tools or ()) if req.tool_choice != "none" else []
        messages, given = rendered_messages(node, req.messages, tools, req.tool_choice)
        variables = template_kwargs(
            req.chat_template_kwargs, req.reasoning_effort, node.tokenizer.template_variables
        )
        chars = prompt_chars(messages, variables)
        check_prompt_size(node, chars, "messages")  # (before any tokenizing)
        ask = Ask(
            chat=True,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            grammar=chat_grammar(req, tools),
            tools=tuple(tools),
            reasoning=reasoning_of(node.tokenizer),
            scores=req.prompt_logprobs,
            token_ids=req.return_token_ids,
            echo=(chat_echo(req),) if chat_echo(req) else (),
        )
        ids = lambda: self._chat_ids(req, messages, given, variables)  # noqa: E731
        return await self.complete(req, ask, ids, request, [chars], respond)

    async def _chat_ids(
        self, req: ChatRequest, messages: list[dict], tools: list[dict] | None, variables: dict
    ) -> list[list[int]]:
        try:
            ids = await self.off_loop(
                lambda: self.node.tokenizer.encode_chat(
                    messages,
                    req.add_generation_prompt,
                    tools=tools,
                    continue_final_message=req.continue_final_message,
                    template_kwargs=variables,
                )
            )
        except Exception as e:  # the chat template refused these messages (e.g. roles not alternating)
            raise InvalidRequest(
                f"the model's chat template rejected the messages: {e}", param="messages"
            ) from e
        return [ids]

    async def completions(self, req: CompletionRequest, request: Request):
        req = with_model_sampling(self.node, req)
        prompts = completion_prompts(self.node, req)

        async def prompt_ids() -> list[list[int]]:
            return [
                p if not isinstance(p, str) else await self.off_loop(self.node.tokenizer.encode, p)
                for p in prompts
            ]

        echo = []
        for p in req.prompts() if req.echo else ():
            # (token ids echo as vLLM's: their text with special tokens, as the logprobs name them)
            echo.append(
                p if isinstance(p, str) else await self.off_loop(self.node.tokenizer.decode, p, frozenset(p))
            )
        asked = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
        ask = Ask(
            chat=False,
            logprobs=req.logprobs,
            grammar=own_grammar(req),
            echo=tuple(echo),
            best_of=req.best_of,
            token_ids=req.return_token_ids,
            scores=max(asked) if asked else None,  # (the prompt's logprobs: echoed, or vLLM's field)
        )
        sizes = [len(p) if isinstance(p, str) else p for p in prompts]
        return await self.complete(req, ask, prompt_ids, request, sizes, self.respond)

    async def complete(
        self,
        req: GenerationRequest,
        ask: Ask,
        prompt_ids: Callable[[], Awaitable[list[list[int]]]],
        request: Request,
        sizes: list[int | list[int]],
        respond: Respond,
    ):
        """Admit the request: at once, after a wait in the queue, or never (429 at once); then
        tokenize its prompts (`prompt_ids()`) and answer it as `respond` shapes it. `sizes`: each
        prompt's characters (text) or its token ids, for the estimate of its KV before tokenizing."""
        node = self.node
        admit(node, req)
        node.active_requests += 1  # counted from arrival, released once when the response is done
        out = _once(lambda: setattr(node, "active_requests", node.active_requests - 1))
        try:
            guess = [len(s) if isinstance(s, list) else self.tokens_of_chars(s) for s in sizes]
            ticket = await self.queued(kv_need(node, req, ask, guess), request)
        except BaseException:
            out()
            raise
        if ticket is None:
            out()
            return Response(status_code=499)  # nobody waits for it

        def release(finished: bool = True) -> None:
            self.admission.release(ticket, finished)
            out()

        try:
            prompts = [truncated(node, req, ids) for ids in await prompt_ids()]
            self.measured(sizes, prompts)
            max_tokens = [max_tokens_for(node, req, ids) for ids in prompts]
            self.admission.resize(ticket, kv_need(node, req, ask, [len(ids) for ids in prompts]))
            return await self.answered(req, ask, prompts, max_tokens, release, request, ticket, respond)
        except BaseException:
            release(finished=False)  # (its time is no request's time)
            raise

    async def queued(self, tokens: int, request: Request) -> Ticket | None:
        """The request's admission ticket for `tokens` KV token slots: Overloaded at once where
        it would wait past --max-queue-wait; None where its client went away while it waited."""
        node = self.node
        counts = coverage(node.table.serving(node.model_id), node.total_layers)
        self.admission.set_budget(node.config.max_cache_tokens * max(1, min(counts, default=1)))
        ticket = self.admission.enter(tokens)  # (Overloaded at once)
        return ticket if await self.admitted(ticket, request) else None

    async def admitted(self, ticket: Ticket, request: Request) -> bool:
        """Wait in the queue until `ticket` is admitted: False where its client went away meanwhile
        (it left the queue)."""
        if ticket.admitted.done():
            return True
        return await unless_gone(
            asyncio.ensure_future(self.admission.wait(ticket)), request, "queued request"
        )

    async def answered(
        self,
        req: GenerationRequest,
        ask: Ask,
        prompts: list[list[int]],
        max_tokens: list[int],
        release: Callable[[], None],
        request: Request,
        ticket: Ticket,
        respond: Respond,
    ) -> Response | dict:
        """The answer of an admitted request. One that a full peer refuses before its first
        token goes back to the head of the queue where this entry's other requests will free
        room (else it is refused now): it was admitted, so it is served, and before anyone
        admitted after it."""
        while True:
            try:
                return await respond(self.answer(req, ask, prompts, max_tokens, release, request))
            except NoRoom as e:
                if not self.admission.requeue(ticket):
                    raise
                log.info("%s; back at the head of the queue", e.message)
            if not await self.admitted(ticket, request):
                release()
                return Response(status_code=499)

    def tokens_of_chars(self, chars: int) -> int:
        """A prompt's tokens, estimated from its characters before it is tokenized."""
        if self.tokens_per_char is None:
            self.tokens_per_char = len(self.node.tokenizer.encode(SAMPLE_TEXT)) / len(SAMPLE_TEXT)
        return max(1, round(chars * self.tokens_per_char))

    def measured(self, sizes: list[int | list[int]], prompts: list[list[int]]) -> None:
        """Tokens per character as the prompts of enough text tokenized."""
        for size, ids in zip(sizes, prompts, strict=True):
            if isinstance(size, int) and size >= MEASURED_CHARS:
                ratio, old = len(ids) / size, self.tokens_per_char
                self.tokens_per_char = ratio if old is None else old + RATIO_WEIGHT * (ratio - old)

    def answer(
        self,
        req: GenerationRequest,
        ask: Ask,
        prompts: list[list[int]],
        max_tokens: list[int],
        release: Callable[[], None],
        request: Request,
    ) -> Answer:
        """The runs of an admitted request, once a route is there (a missing route is a 503
        before anything is computed)."""
        node = self.node
        try:
            route = current_route(node, routing_key(prompts[0]), banned_now(node))
        except NoRouteError as e:
            raise SwarmUnavailable(str(e)) from None
        headers = unchecked_header(node, route)
        runs = [Run(node, spec) for spec in run_specs(node, req, ask, prompts, max_tokens)]
        request.scope[RUN_KEY] = Usage(runs)  # its token count goes into the request's log line
        rid = ("chatcmpl-" if ask.chat else "cmpl-") + uuid.uuid4().hex[:24]
        shape = Shape(
            rid,
            node.served_model,
            ask.chat,
            node.tokenizer,
            ask.logprobs,
            list(ask.tools),
            ask.reasoning is not None,
            ask.token_ids,
            req.prompt_logprobs,
            echo=bool(ask.echo),
            tokens_as_ids=req.return_tokens_as_token_ids,
        )
        events = merged([r.events() for r in runs], ask.best_of or req.n)
        if ask.grammar is not None:
            events = grammar_failures_named(events, grammar_param(req))
        return Answer(req, ask, runs, shape, events, release, request, headers)

    async def respond(self, answer: Answer) -> Response | dict:
        """The answer, streamed or whole as the request asked."""
        if answer.req.stream:
            return await self.streamed(answer)
        return await whole(answer)

    async def streamed(self, answer: Answer) -> Response:
        """The answer as server-sent events. The first token is computed before the response
        starts, so that a request that cannot start (no route, no room) gets its real status
        instead of 200 and an error."""
        req, ask, events = answer.req, answer.ask, answer.events
        priming = asyncio.ensure_future(first_events(events))
        try:
            if not await unless_gone(priming, answer.request):
                answer.release()
                return Response(status_code=499)  # nobody reads it
            first = priming.result()
        except BaseException:
            await events.aclose()
            raise
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and req.stream_options.continuous_usage_stats  # (as vLLM's)
        echo = [ask.echo[k] for k in range(answer.prompts) for _ in range(req.n)] if ask.echo else []
        prompts = [run.prompt_ids for run in answer.runs for _ in range(req.n)]
        running = (lambda: usage(answer.runs)) if continuous else None
        chunks = Chunks(answer.shape, answer.prompts * req.n, echo, prompts, running)
        return StreamingResponse(
            sse(
                first,
                events,
                chunks,
                lambda: usage(answer.runs) if include_usage else None,
                answer.release,
                self.node.config.sse_keepalive_s,
            ),
            media_type="text/event-stream",
            headers=answer.headers,
            background=BackgroundTask(answer.release),
        )


async def whole(answer: Answer) -> Response | dict:
    """The answer as one JSON body, once every sequence has ended."""
    req, ask = answer.req, answer.ask
    task = asyncio.ensure_future(collect(answer.events, answer.prompts * (ask.best_of or req.n)))
    if not await unless_gone(task, answer.request):
        answer.release()
        return Response(status_code=499)  # nobody reads it
    choices = task.result()  # (a failure is released by the caller, or queued again: NoRoom)
    answer.release()
    if ask.best_of:
        choices = best(choices, answer.prompts, ask.best_of, req.n)
    for k, choice in enumerate(choices):
        choice.prompt = answer.runs[k // req.n].prompt_ids
        if ask.echo:
            choice.echo = ask.echo[k // req.n]
    body = answer.shape.whole(choices, usage(answer.runs))
    return JSONResponse(body, headers=answer.headers) if answer.headers else body


def unchecked_header(node: ApiPeer, route: list) -> dict[str, str]:
    """UNCHECKED_HEADER where the request's route runs layers that no other serving peer (nor
    chain of them) could recompute, so that no check but the entry's own (--self-referee) can
    cover them: their spans, start:end, comma-separated (none: no header)."""
    spans = unchecked_layers(node, route)
    if not spans:
        return {}
    return {UNCHECKED_HEADER: ",".join(f"{a}:{b}" for a, b in spans)}


async def grammar_failures_named(events: AsyncIterator[Event], param: str) -> AsyncIterator[Event]:
    """`events`; a grammar that fails while generating (GrammarError) ends them as a 400 that
    names `param`, the request's grammar (an error event once a stream has started)."""
    try:
        async for event in events:
            yield event
    except GrammarError as e:
        raise InvalidRequest(f"{param}: {e}", param=param, code="grammar_failed") from None
    finally:
        await events.aclose()


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = []

    def call():
        if not done:
            done.append(True)
            fn()

    return call


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
