"""The OpenAI-compatible API every peer serves: /v1/chat/completions and /v1/completions, with
logprobs, sampling controls, structured output, tools, streaming as server-sent events. The
request bodies are in openai_schema.py, the response shapes in openai_shapes.py."""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from inference.grammar import GrammarError, json_object_grammar, json_schema_grammar, tool_call_grammar

from .consensus import checked_generate, verified_generate
from .entry import RETRY_AFTER_S, Token, banned_now, current_route, generate
from .errors import InvalidRequest, ModelNotServed, Overloaded, SwarmUnavailable
from .logs import RUN_KEY
from .metrics import TokenClock
from .node import PeerNode
from .openai_schema import MAX_PROMPTS, ChatMessage, ChatRequest, CompletionRequest, NamedTool, _Request
from .openai_shapes import Choice, Shape, sse
from .protocol import Sampling
from .routing import NoRouteError
from .steering import Steering
from .textstream import TextStream
from .tools import chat_messages, template_tools, with_tool_prompt

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


def router(node: PeerNode) -> APIRouter:
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


def _fill_in_the_middle(node: PeerNode, prompts: list, suffix: str) -> list[str]:
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


def _admit(node: PeerNode, req: _Request) -> None:
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


def _check(node: PeerNode, req: _Request, prompt_ids: list[int]) -> int:
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


def _sampling(node: PeerNode, req: _Request, ask: Ask) -> Sampling:
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


def _steering(node: PeerNode, req: _Request, ask: Ask, stop_ids: frozenset[int]) -> Steering | None:
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
    node: PeerNode,
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
    node: PeerNode,
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
            _Run(node, ids, limit, s, stops, stop_ids, width, req.consensus, verify, speculative, steering)
        )
    request.scope[RUN_KEY] = _Usage(runs)  # its token count goes into the request's log line
    rid = ("chatcmpl-" if ask.chat else "cmpl-") + uuid.uuid4().hex[:24]
    shape = Shape(rid, node.served_model, ask.chat, node.tokenizer, ask.logprobs, list(ask.tools))
    events = _merged([r.events() for r in runs], width)
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
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        echo = [ask.echo[k] for k in range(len(prompts)) for _ in range(req.n)] if ask.echo else []
        return StreamingResponse(
            sse(
                first,
                events,
                shape,
                len(prompts) * req.n,
                echo,
                lambda: _usage(runs) if include_usage else None,
                release,
                node.config.sse_keepalive_s,
            ),
            media_type="text/event-stream",
            background=BackgroundTask(release),
        )
    task = asyncio.ensure_future(_collect(events, len(prompts) * width))
    try:
        if not await unless_gone(task, request):
            return Response(status_code=499)  # nobody reads it
        choices = task.result()
    finally:
        release()
    if ask.best_of:
        choices = _best(choices, len(prompts), ask.best_of, req.n)
    for k, choice in enumerate(choices):
        if ask.echo:
            choice.echo = ask.echo[k // req.n]
    return shape.whole(choices, _usage(runs))


def _best(choices: list[Choice], prompts: int, best_of: int, n: int) -> list[Choice]:
    """Of each prompt's best_of sequences, the n with the highest total logprob, in that order."""
    out = []
    for k in range(prompts):
        group = choices[k * best_of : (k + 1) * best_of]
        out += sorted(group, key=lambda c: -sum(t.logprob for t in c.tokens))[:n]
    return out


class _Usage:
    """The runs of one request, as the request log line counts them."""

    def __init__(self, runs: list["_Run"]):
        self.runs = runs

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.runs)


def _usage(runs: list["_Run"]) -> dict:
    p = sum(len(r.prompt_ids) for r in runs)
    c = sum(r.completion_tokens for r in runs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


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


async def _collect(events: AsyncIterator, count: int) -> list[Choice]:
    choices = [Choice(i) for i in range(count)]
    async for kind, index, a, b in events:
        if kind == "delta":
            choices[index].text.append(a)
            choices[index].tokens += b
        elif kind == "finish":
            choices[index].finish = b
    return choices


async def _merged(streams: list[AsyncIterator], width: int) -> AsyncIterator[tuple]:
    """The events of several runs as one stream; run k's sequence i becomes choice k * width + i."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield event
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream: AsyncIterator) -> None:
        try:
            async for kind, i, a, b in stream:
                await queue.put((kind, i if i < 0 else k * width + i, a, b))
            await queue.put(None)
        except Exception as e:
            await queue.put(e)
        finally:
            await stream.aclose()

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Run:
    """One generation of n sequences of one prompt: tokens -> text deltas (each with the tokens
    it covers), finish reasons and usage."""

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
        steering: Steering | None = None,
    ):
        """`routes` > 1: that many whole routes, the majority deciding (the consensus field);
        `verify`: every replicated hop recomputed by a shadow (--verify-rate); `speculative`:
        drafted tokens checked by the chain where that applies (one sequence, unchecked)."""
        self.node, self.prompt_ids, self.max_tokens = node, prompt_ids, max_tokens
        self.routes, self.verify, self.speculative = routes, verify, speculative
        self.sampling, self.stop_ids, self.n, self.steering = sampling, stop_ids, n, steering
        self.texts = [TextStream(node.tokenizer, stops) for _ in range(n)]
        self.held: list[list[Token]] = [[] for _ in range(n)]  # tokens whose text is not out yet
        self.finish = ["length"] * n
        self.done = [False] * n
        self.completion_tokens = 0
        self.clock = TokenClock(node.metrics, len(prompt_ids))

    async def events(self) -> AsyncIterator[tuple]:
        """("token", -1, None, None) after each step; per sequence i ("delta", i, text, tokens)
        and ("finish", i, None, reason)."""
        args = (self.node, self.prompt_ids, self.max_tokens, self.sampling, self.stop_ids, self.n)
        if self.verify:
            gen = verified_generate(*args, steering=self.steering)
        elif self.routes > 1:
            gen = checked_generate(*args, routes=self.routes, steering=self.steering)
        else:
            gen = generate(*args, speculative=self.speculative, steering=self.steering)
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
                    self.held[i].append(tok)
                    delta = self.texts[i].push(tok.token)
                    if delta:
                        yield ("delta", i, delta, self._take(i))
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

    def _take(self, i: int) -> list[Token]:
        held, self.held[i] = self.held[i], []
        return held

    def _end(self, i: int, reason: str):
        self.done[i], self.finish[i] = True, reason
        rest = self.texts[i].finish()
        if rest:
            yield ("delta", i, rest, self._take(i))
        yield ("finish", i, None, reason)
