"""The OpenAI-compatible API every peer serves: /v1/chat/completions and /v1/completions, with
logprobs, sampling controls, structured output, tools, streaming as server-sent events. The
request bodies are in openai_schema.py, the response shapes in openai_shapes.py."""

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from inference.grammar import GrammarError, json_object_grammar, json_schema_grammar, tool_call_grammar
from peers.api.door import ApiPeer
from peers.api.runs import Run, Usage, best, collect, first_events, merged, usage
from peers.api.schema import MAX_PROMPTS, ChatMessage, ChatRequest, CompletionRequest, NamedTool, _Request
from peers.api.shapes import Shape, sse
from peers.api.tools import chat_messages, template_tools, with_tool_prompt
from peers.entry.generation import RETRY_AFTER_S, banned_now, current_route
from peers.entry.steering import Steering
from peers.swarm.routing import NoRouteError
from peers.transport.errors import InvalidRequest, ModelNotServed, Overloaded, SwarmUnavailable
from peers.transport.frames import Sampling
from peers.transport.logs import RUN_KEY

__all__ = ["ChatMessage", "router", "unless_gone"]

MAX_CHARS_PER_TOKEN = 64  # no token of a real vocabulary is longer: longer prompts cannot fit
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
DEFAULT_MAX_TOKENS = 1024  # when a request names none: this, or what the context has left
FIM_TOKENS = (  # fill-in-the-middle markers: a model with one of these sets takes `suffix`
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
)

log = logging.getLogger("layerswarm.api")


@dataclass(frozen=True)
class Ask:
    """What a request wants besides its tokens, read from its body."""

    chat: bool
    logprobs: int | None = None  # None: none; k: the sampled token's and k alternatives
    grammar: str | None = None  # the output follows it (response_format, forced tool calls)
    tools: tuple = ()  # the calls in the output are parsed into message.tool_calls
    echo: tuple[str, ...] = ()  # per prompt: text put before its outputs (completions' echo)
    best_of: int | None = None  # sequences generated per prompt, of which the n likeliest are kept


def _text_of(content: str | list[dict]) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest("only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def router(node: ApiPeer) -> APIRouter:
    api = APIRouter()
    tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")  # off the event loop

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenize, fn, *args)

    @api.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        tools = list(req.tools or ()) if req.tool_choice != "none" else []
        generic = bool(tools) and not node.tokenizer.template_takes_tools
        try:
            messages = chat_messages(req.messages, _text_of, generic)
        except ValueError as e:
            raise InvalidRequest(str(e), param="messages") from None
        if generic:
            messages = with_tool_prompt(messages, tools, req.tool_choice)
        _check_prompt_size(node, sum(len(m["content"]) for m in messages), "messages")
        ask = Ask(
            chat=True,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            grammar=_chat_grammar(req, tools),
            tools=tuple(tools),
        )

        async def prompt_ids() -> list[list[int]]:
            try:
                ids = await off_loop(
                    lambda: node.tokenizer.encode_chat(
                        messages,
                        req.add_generation_prompt,
                        tools=template_tools(tools) if tools and not generic else None,
                        continue_final_message=req.continue_final_message,
                    )
                )
            except Exception as e:  # the chat template refused these messages (e.g. roles not alternating)
                raise InvalidRequest(
                    f"the model's chat template rejected the messages: {e}", param="messages"
                ) from e
            return [ids]

        return await _complete(node, req, ask, prompt_ids, request)

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts = req.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequest(
                f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt"
            )
        if req.echo and req.logprobs is not None:
            raise InvalidRequest(
                "echo with logprobs is not supported: it needs the logprobs of the prompt's tokens",
                param="echo",
            )
        if req.suffix:
            prompts = _fill_in_the_middle(node, prompts, req.suffix)
        _check_prompt_size(node, max(len(p) for p in prompts), "prompt")
        vocab = node.model_config.vocab_size
        for p in prompts:
            if not isinstance(p, str) and not all(0 <= t < vocab for t in p):
                raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")

        async def prompt_ids() -> list[list[int]]:
            return [
                p if not isinstance(p, str) else await off_loop(node.tokenizer.encode, p) for p in prompts
            ]

        echo = []
        for p in req.prompts() if req.echo else ():
            echo.append(p if isinstance(p, str) else await off_loop(node.tokenizer.decode, p))
        ask = Ask(chat=False, logprobs=req.logprobs, echo=tuple(echo), best_of=req.best_of)
        return await _complete(node, req, ask, prompt_ids, request)

    return api


def _chat_grammar(req: ChatRequest, tools: list) -> str | None:
    """The grammar the output must follow: the response format's, or forced tool calls'."""
    forced = isinstance(req.tool_choice, NamedTool) or req.tool_choice == "required"
    fmt = req.response_format
    if fmt is not None and fmt.type != "text" and forced:
        raise InvalidRequest(
            "response_format and a forced tool_choice exclude each other", param="response_format"
        )
    if req.ignore_eos and (forced or (fmt is not None and fmt.type != "text")):
        raise InvalidRequest("ignore_eos cannot end a structured output", param="ignore_eos")
    try:
        if forced:
            name = req.tool_choice.function.name if isinstance(req.tool_choice, NamedTool) else None
            specs = [t.model_dump(exclude_none=True) for t in tools]
            return tool_call_grammar(specs, name, req.parallel_tool_calls)
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return json_object_grammar()
        return json_schema_grammar(fmt.json_schema.schema_)
    except GrammarError as e:
        param = "tools" if forced else "response_format"
        raise InvalidRequest(f"{param}: {e}", param=param) from None


def _fill_in_the_middle(node: ApiPeer, prompts: list, suffix: str) -> list[str]:
    """`suffix`: prompt and suffix around the model's fill-in-the-middle markers."""
    marks = next((m for m in FIM_TOKENS if node.tokenizer.special_ids(*m) is not None), None)
    if marks is None:
        raise InvalidRequest(
            f"this model ({node.served_model}) has no fill-in-the-middle tokens: it cannot take a suffix",
            param="suffix",
        )
    if not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest("suffix takes text prompts, not token ids", param="suffix")
    pre, suf, mid = marks
    return [f"{pre}{p}{suf}{suffix}{mid}" for p in prompts]


def _check_prompt_size(node: ApiPeer, chars: int, param: str) -> None:
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


def _admit(node: ApiPeer, req: _Request) -> None:
    """Before any work: the model, and room for one more request at this entry (so that no more
    than --max-requests prompts wait for the tokenizer either)."""
    if req.model not in node.served_names:
        raise ModelNotServed(req.model, node.served_model)
    if node.active_requests >= node.config.max_requests:
        raise Overloaded(
            f"this peer already serves {node.active_requests} requests at once (--max-requests "
            f"{node.config.max_requests}); retry in {RETRY_AFTER_S} s or use another peer",
            RETRY_AFTER_S,
        )
    if node.stopping or node.table.me.state in ("leaving", "dead"):
        raise SwarmUnavailable("this peer is shutting down; send the request to another peer")


def _check(node: ApiPeer, req: _Request, prompt_ids: list[int]) -> int:
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


def _sampling(node: ApiPeer, req: _Request, ask: Ask) -> Sampling:
    vocab = node.model_config.vocab_size
    bias = tuple(sorted((int(k), float(v)) for k, v in (req.logit_bias or {}).items()))
    if any(t >= vocab for t, _ in bias):
        raise InvalidRequest(f"logit_bias names token ids outside [0, {vocab})", param="logit_bias")
    if any(not 0 <= t < vocab for t in req.stop_token_ids or ()):
        raise InvalidRequest(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
    return Sampling(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        min_p=req.min_p,
        logit_bias=bias,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        top_logprobs=ask.logprobs or 0,
    )


def _steering(node: ApiPeer, req: _Request, ask: Ask, stop_ids: frozenset[int]) -> Steering | None:
    counts = (req.presence_penalty, req.frequency_penalty, req.repetition_penalty) != (0, 0, 1)
    if not (counts or req.min_tokens or ask.grammar):
        return None
    return Steering(
        tokenizer=node.tokenizer.hf,
        vocab_size=node.model_config.vocab_size,
        stop_ids=stop_ids,
        min_tokens=req.min_tokens,
        counts=counts,
        grammar=ask.grammar,
    )


async def _complete(
    node: ApiPeer,
    req: _Request,
    ask: Ask,
    prompt_ids: Callable[[], Awaitable[list[list[int]]]],
    request: Request,
):
    """Admit the request, tokenize its prompts (`prompt_ids()`), then answer it."""
    _admit(node, req)
    node.active_requests += 1  # counted from admission, released once when the response is done
    release = _once(lambda: setattr(node, "active_requests", node.active_requests - 1))
    try:
        prompts = await prompt_ids()
        max_tokens = [_check(node, req, ids) for ids in prompts]
        return await _respond(node, req, ask, prompts, max_tokens, release, request)
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
    node: ApiPeer,
    req: _Request,
    ask: Ask,
    prompts: list[list[int]],
    max_tokens: list[int],
    release,
    request: Request,
):
    try:  # a missing route is a 503 before anything is computed
        current_route(node, "probe", banned_now(node))
    except NoRouteError as e:
        raise SwarmUnavailable(str(e)) from None
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sampling = _sampling(node, req, ask)
    eos = frozenset() if req.ignore_eos else node.tokenizer.eos_token_ids
    stop_ids = eos | frozenset(req.stop_token_ids or ())
    steering = _steering(node, req, ask, node.tokenizer.eos_token_ids | frozenset(req.stop_token_ids or ()))
    verify = req.consensus == 1 and node.should_verify()
    speculative = req.speculative and node.config.speculative
    width = ask.best_of or req.n
    runs = []
    for ids, limit in zip(prompts, max_tokens, strict=True):
        s = (
            replace(sampling, prompt_tokens=tuple(sorted(set(ids))))
            if req.repetition_penalty != 1
            else sampling
        )
        runs.append(
            Run(
                node,
                ids,
                limit,
                s,
                stops,
                stop_ids,
                width,
                req.consensus,
                verify,
                speculative,
                steering,
                bool(ask.tools),
            )
        )
    request.scope[RUN_KEY] = Usage(runs)  # its token count goes into the request's log line
    rid = ("chatcmpl-" if ask.chat else "cmpl-") + uuid.uuid4().hex[:24]
    shape = Shape(rid, node.served_model, ask.chat, node.tokenizer, ask.logprobs, list(ask.tools))
    events = merged([r.events() for r in runs], width)
    if req.stream:
        # The first token is computed before the response starts, so that a request that
        # cannot start (no route, no room) gets its real status instead of 200 and an error.
        priming = asyncio.ensure_future(first_events(events))
        try:
            if not await unless_gone(priming, request):
                release()
                return Response(status_code=499)  # nobody reads it
            first = priming.result()
        except BaseException:
            await events.aclose()
            raise
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        echo = [ask.echo[k] for k in range(len(prompts)) for _ in range(req.n)] if ask.echo else []
        return StreamingResponse(
            sse(
                first,
                events,
                shape,
                len(prompts) * req.n,
                echo,
                lambda: usage(runs) if include_usage else None,
                release,
                node.config.sse_keepalive_s,
            ),
            media_type="text/event-stream",
            background=BackgroundTask(release),
        )
    task = asyncio.ensure_future(collect(events, len(prompts) * width))
    try:
        if not await unless_gone(task, request):
            return Response(status_code=499)  # nobody reads it
        choices = task.result()
    finally:
        release()
    if ask.best_of:
        choices = best(choices, len(prompts), ask.best_of, req.n)
    for k, choice in enumerate(choices):
        if ask.echo:
            choice.echo = ask.echo[k // req.n]
    return shape.whole(choices, usage(runs))


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
