"""What a completion request asks for besides its prompts, read and checked: admission, the
grammar its output follows, max_tokens, the sampling controls and steering, and from these the
spec of each prompt's run."""

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from inference.grammar import GrammarError, json_object_grammar, json_schema_grammar, tool_call_grammar
from inference.grammar_forms import choice_grammar, gbnf_grammar, regex_grammar
from inference.models import sampling_defaults
from peers.api.door import ApiPeer
from peers.api.reasoning import PROMPT_TAIL_TOKENS, Reasoning, ReasoningStart
from peers.api.runs import RunSpec
from peers.api.schema import ChatRequest, GenerationRequest, NamedTool
from peers.entry.admission import kv_tokens
from peers.entry.steering import Steering
from peers.transport.errors import InvalidRequest, ModelNotServed, SwarmUnavailable
from peers.transport.frames import Sampling

DEFAULT_MAX_TOKENS = 1024  # when a chat request names none: this, or what the context has left
COMPLETION_MAX_TOKENS = 16  # when a completion request names none (OpenAI's legacy API and vLLM)
G = TypeVar("G", bound=GenerationRequest)
OWN_GRAMMARS = ("structured_outputs", "grammar")  # the fields of a grammar a request brings itself


@dataclass(frozen=True)
class Ask:
    """What a request wants besides its tokens, read from its body."""

    chat: bool
    logprobs: int | None = None  # None: none; k: the sampled token's and k alternatives
    grammar: str | None = None  # the output follows it (response_format, forced tool calls)
    tools: tuple = ()  # the calls in the output are parsed into message.tool_calls
    echo: tuple[str, ...] = ()  # per prompt: text put before its outputs (completions' echo)
    best_of: int | None = None  # sequences generated per prompt, of which the n likeliest are kept
    reasoning: Reasoning | None = None  # a thinking model's chat: its thought apart from its content
    scores: int | None = None  # prompt logprobs (echo with logprobs, prompt_logprobs): top tokens each
    token_ids: bool = False  # the answer carries the prompt's and the output's token ids (vLLM's)


def grammar_param(req: GenerationRequest) -> str:
    """The parameter that set a request's grammar: structured_outputs, grammar, its
    response_format, or its forced tools."""
    for name in OWN_GRAMMARS:
        if getattr(req, name) is not None:
            return name
    fmt = req.response_format if isinstance(req, ChatRequest) else None
    return "response_format" if fmt is not None and fmt.type != "text" else "tool_choice"


def own_grammar(req: GenerationRequest) -> str | None:
    """The grammar a request brings itself (vLLM's structured_outputs or llama.cpp's grammar, one
    at most), compiled: one the engine refuses is a 400 naming its field."""
    so = req.structured_outputs
    if so is not None and req.grammar is not None:
        raise InvalidRequest("structured_outputs and grammar exclude each other", param="grammar")
    if req.ignore_eos and (so is not None or req.grammar is not None):
        raise InvalidRequest("ignore_eos cannot end a structured output", param="ignore_eos")
    param = "grammar" if so is None else f"structured_outputs.{so.kind}"
    try:
        if so is None:
            return None if req.grammar is None else gbnf_grammar(req.grammar)
        if so.kind == "json":
            return json_schema_grammar(_schema(so.json_schema))
        if so.kind == "regex":
            return regex_grammar(so.regex)
        if so.kind == "choice":
            return choice_grammar(so.choice)
        return gbnf_grammar(so.grammar) if so.kind == "grammar" else json_object_grammar()
    except GrammarError as e:
        raise InvalidRequest(f"{param}: {e}", param=param) from None


def _schema(schema: dict | str) -> dict:
    """A JSON schema given as an object or as its JSON text."""
    if isinstance(schema, dict):
        return schema
    try:
        return json.loads(schema)
    except ValueError as e:
        raise GrammarError(f"the schema is not valid JSON: {e}") from None


def chat_grammar(req: ChatRequest, tools: list) -> str | None:
    """The grammar the output must follow: the request's own, the response format's, or forced
    tool calls'."""
    forced = isinstance(req.tool_choice, NamedTool) or req.tool_choice == "required"
    fmt = req.response_format
    own = own_grammar(req)
    if own is not None and (forced or (fmt is not None and fmt.type != "text")):
        other = "tool_choice" if forced else "response_format"
        param = grammar_param(req)
        raise InvalidRequest(f"{param} and {other} exclude each other", param=param)
    if own is not None:
        return own
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


def admit(node: ApiPeer, req: GenerationRequest) -> None:
    """Before any work: the model, and a peer that is not shutting down (room at this entry is
    the admission queue's: peers/entry/admission.py)."""
    if req.model is not None and req.model not in node.served_names:
        raise ModelNotServed(req.model, node.served_model)
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked >= node.context_length:  # (never served: no queue, no retry)
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise InvalidRequest(
            f"this model's maximum context length is {node.context_length} tokens; {param} {asked} "
            "leaves no room for a prompt",
            param=param,
            code="context_length_exceeded",
        )
    if node.stopping or node.table.me.state in ("leaving", "dead"):
        raise SwarmUnavailable("this peer is shutting down; send the request to another peer")


def stops_of(req: GenerationRequest) -> list[str]:
    """The request's stop sequences as a list (`stop` may be one string, a list, or none)."""
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def max_tokens_for(node: ApiPeer, req: GenerationRequest, prompt_ids: list[int]) -> int:
    """Validate what pydantic cannot; returns max_tokens."""
    stops = stops_of(req)
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
    return _max_tokens(node, req, len(prompt_ids))


def _max_tokens(node: ApiPeer, req: GenerationRequest, prompt_tokens: int) -> int:
    """The max_tokens asked, else the default within the context's room."""
    asked = req.max_completion_tokens or req.max_tokens
    default = DEFAULT_MAX_TOKENS if isinstance(req, ChatRequest) else COMPLETION_MAX_TOKENS
    return asked or min(default, max(1, node.context_length - prompt_tokens))


def kv_need(node: ApiPeer, req: GenerationRequest, ask: Ask, prompt_tokens: list[int]) -> int:
    """The KV token slots a request may hold on each peer of its route, from its prompts' token
    counts (estimated before tokenizing, true after): each prompt plus max_tokens for each of
    its sequences."""
    sequences = ask.best_of or req.n
    return sum(kv_tokens(p, _max_tokens(node, req, p), sequences) for p in prompt_tokens)


@functools.cache
def _model_sampling(model_id: str, path: str, mode: str) -> dict:
    return {} if mode == "none" else sampling_defaults(model_id, Path(path))


def model_sampling(node: ApiPeer) -> dict:
    """What a request that names no sampling gets (--generation-config: the model's own)."""
    return _model_sampling(node.model_id, str(node.model_path), node.config.generation_config)


def with_model_sampling(node: ApiPeer, req: G) -> G:
    """The request with the model's sampling (model_sampling) where it names none of its own."""
    unset = {k: v for k, v in model_sampling(node).items() if k not in req.model_fields_set}
    return req.model_copy(update=unset) if unset else req


def sampling_of(node: ApiPeer, req: GenerationRequest, ask: Ask) -> Sampling:
    """The sampling controls, token ids checked against the vocabulary."""
    vocab = node.model_config.vocab_size
    bias = tuple(sorted((int(k), float(v)) for k, v in (req.logit_bias or {}).items()))
    if any(t >= vocab for t, _ in bias):
        outside = sorted(t for t, _ in bias if t >= vocab)
        raise InvalidRequest(
            f"logit_bias names token ids outside [0, {vocab}): {', '.join(map(str, outside))}",
            param="logit_bias",
        )
    if any(not 0 <= t < vocab for t in req.stop_token_ids or ()):
        outside = sorted(t for t in req.stop_token_ids if not 0 <= t < vocab)
        raise InvalidRequest(
            f"stop_token_ids must be in [0, {vocab}), got {', '.join(map(str, outside))}",
            param="stop_token_ids",
        )
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


def steering_of(node: ApiPeer, req: GenerationRequest, ask: Ask, stop_ids: frozenset[int]) -> Steering | None:
    """The entry's steering (penalties' counts, min_tokens, a grammar), or None where none is asked."""
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


def run_specs(
    node: ApiPeer, req: GenerationRequest, ask: Ask, prompts: list[list[int]], max_tokens: list[int]
) -> list[RunSpec]:
    """One run's spec per prompt, all with the request's controls."""
    sampling = sampling_of(node, req, ask)
    eos = frozenset() if req.ignore_eos else node.tokenizer.eos_token_ids
    stop_ids = frozenset(req.stop_token_ids or ())
    steering = steering_of(node, req, ask, node.tokenizer.eos_token_ids | stop_ids)
    common = RunSpec(
        prompt_ids=[],
        max_tokens=0,
        sampling=sampling,
        stops=stops_of(req),
        stop_ids=eos | stop_ids,
        n=ask.best_of or req.n,
        routes=req.consensus,
        # (each hop drawn at the rate; prompt logprobs come from the plain route)
        verify=req.consensus == 1 and ask.scores is None and node.should_verify(),
        speculative=req.speculative and node.config.speculative,
        steering=steering,
        tools=bool(ask.tools),
        scores=ask.scores,
    )
    specs = []
    for ids, limit in zip(prompts, max_tokens, strict=True):
        s = (
            replace(sampling, prompt_tokens=tuple(sorted(set(ids))))
            if req.repetition_penalty != 1
            else sampling
        )
        start = reasoning_start(node, req, ask, ids)
        keep = ask.reasoning.keep if ask.reasoning else frozenset()
        specs.append(
            replace(common, prompt_ids=ids, max_tokens=limit, sampling=s, reasoning=start, keep=keep)
        )
    return specs


def reasoning_start(node: ApiPeer, req: GenerationRequest, ask: Ask, ids: list[int]) -> ReasoningStart | None:
    """Where a thinking model's output of prompt `ids` starts. A grammar rules the output from its
    first token: where the prompt has opened the thinking, it would rule the thought, and the
    request is refused; elsewhere it keeps the model from opening one (all is content)."""
    if ask.reasoning is None:
        return None
    start = ask.reasoning.start(node.tokenizer.decode(ids[-PROMPT_TAIL_TOKENS:], ask.reasoning.keep))
    if start.inside and ask.grammar is not None:
        param = grammar_param(req)
        raise InvalidRequest(
            f"{param}: the chat template opens the model's thinking, where a grammar cannot apply; "
            'turn the thinking off (e.g. chat_template_kwargs {"enable_thinking": false}) or leave '
            f"{param} out",
            param=param,
        )
    return start
