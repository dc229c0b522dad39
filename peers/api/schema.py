"""The OpenAI request bodies this server takes, as pydantic models. A field it does not implement
is refused with a 400 naming it (extra="forbid"); the only ones accepted without effect are
metadata (NO_OP_FIELDS), as the README says."""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from peers.entry.consensus import MAX_CONSENSUS
from peers.transport.frames import MAX_TOP_LOGPROBS

MAX_N = 16  # sequences per request (n, or best_of)
MAX_PROMPTS = 32  # prompts in one completions request
MAX_LOGIT_BIAS = 1024  # entries
MAX_STOP_TOKEN_IDS = 64
MAX_TOOLS = 128
MAX_COMPLETION_LOGPROBS = 5  # as OpenAI's completions endpoint
MAX_TEMPLATE_KWARGS = 32
# what the door itself gives the chat template (or transformers' apply_chat_template takes):
# chat_template_kwargs may not set these
TEMPLATE_ARGS = (
    "messages",
    "conversation",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "padding",
    "truncation",
    "max_length",
    "return_tensors",
    "return_dict",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
)


def _template_kwargs(value: dict) -> dict:
    if len(value) > MAX_TEMPLATE_KWARGS:
        raise ValueError(f"at most {MAX_TEMPLATE_KWARGS} entries, got {len(value)}")
    clash = [k for k in value if k in TEMPLATE_ARGS]
    if clash:
        raise ValueError(
            f"{', '.join(clash)} may not be set here: the request's own fields give them to the template"
        )
    return value


# as in vLLM: more variables for the chat template (e.g. {"enable_thinking": false})
TemplateKwargs = Annotated[dict[str, Any], AfterValidator(_template_kwargs)]

# Accepted and without effect on the answer: they only describe the request
NO_OP_FIELDS = ("user", "metadata", "store", "service_tier")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # as vLLM's: usage so far on every chunk


class StructuredOutputs(_Strict):
    """vLLM's structured_outputs: one constraint on the output. Its other fields (structural_tag,
    whitespace_pattern, disable_additional_properties) are refused by name."""

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")  # a schema, or its JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # GBNF or Lark
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # (either way: JSON here has no free whitespace)
    disable_fallback: bool = False  # (either way: one engine here, nothing to fall back to)

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("json_schema", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object; "
                f"got {len(given)}"
            )
        return self

    @property
    def kind(self) -> str:
        """Which constraint it is: json, regex, choice, grammar or json_object."""
        for name in ("regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json" if self.json_schema is not None else "json_object"


class GenerationRequest(_Strict):
    """The fields both completion endpoints take."""

    model: str | None = None  # None: the served model (as vLLM's; OpenAI's requires it)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # an extension, as in vLLM (-1 there: 0 here means no cut)
    min_p: float = Field(0.0, ge=0, le=1)  # an extension, as in vLLM
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)  # an extension, as in vLLM
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(0, ge=0)  # an extension, as in vLLM: no stop id before that many
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)  # as in vLLM
    ignore_eos: bool = False  # an extension, as in vLLM: generate max_tokens whatever comes
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # (int64, as OpenAI's and vLLM's)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    consensus: int = Field(1, ge=1, le=MAX_CONSENSUS)  # an extension: k routes, the majority decides
    speculative: bool = True  # an extension: false turns off drafting for this request
    stream: bool = False
    stream_options: StreamOptions | None = None
    # as in vLLM: each prompt token's logprob (and this many likeliest tokens at its position)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # as in vLLM: keep this many of the prompt's tokens (-1: as many as the context holds), cut
    # on `truncation_side` (left, the default: the last ones are kept)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    return_tokens_as_token_ids: bool = False  # as in vLLM: logprobs name tokens "token_id:ID"
    return_token_ids: bool = False  # as in vLLM: the prompt's and the output's token ids too
    structured_outputs: StructuredOutputs | None = None  # as in vLLM: the output follows it
    grammar: str | None = None  # as in llama.cpp's server: a GBNF grammar the output follows
    # metadata only (NO_OP_FIELDS)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _truncation(self):
        if self.truncate_prompt_tokens == 0:
            raise ValueError("truncate_prompt_tokens keeps at least 1 token (or -1: the context's worth)")
        if self.truncation_side is not None and self.truncate_prompt_tokens is None:
            raise ValueError("truncation_side goes with truncate_prompt_tokens")
        return self

    @model_validator(mode="after")
    def _prompt_logprobs(self):
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs are not available with stream: true (as in vLLM)")
        if self.prompt_logprobs is not None and self.consensus > 1:
            raise ValueError("prompt_logprobs come from one route: not with consensus > 1")
        return self

    @model_validator(mode="after")
    def _bias(self):
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} entries")
            bad = {k: v for k, v in self.logit_bias.items() if not k.isdigit() or not -100 <= v <= 100}
            if bad:
                raise ValueError(
                    f"logit_bias maps token ids to biases in [-100, 100]; got {', '.join(f'{k!r}: {v}' for k, v in bad.items())}"
                )
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options goes with stream: true")
        return self


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call
    # an assistant's earlier thought, as this server answers it (vLLM's newer name: reasoning)
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content may be null only in an assistant message with tool_calls")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry a tool_call_id (the call they answer)")
        if (self.reasoning_content is not None or self.reasoning is not None) and self.role != "assistant":
            raise ValueError("only assistant messages carry reasoning_content (an earlier thought)")
        if self.reasoning_content is not None and self.reasoning is not None:
            raise ValueError("reasoning_content and reasoning are one field: give one")
        return self

    @property
    def thought(self) -> str | None:
        """An assistant's earlier thought (reasoning_content, or reasoning)."""
        return self.reasoning_content if self.reasoning_content is not None else self.reasoning


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None  # the call is always well-formed here: arguments follow the schema


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedTool(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedTool | None


def check_tool_choice(tools: list[Tool] | None, choice: ToolChoice) -> None:
    """ValueError where `choice` asks for tools that `tools` do not give."""
    if choice is not None and choice != "none" and not tools:
        raise ValueError("tool_choice needs tools")
    if isinstance(choice, NamedTool) and choice.function.name not in {t.function.name for t in tools}:
        raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the output always follows the schema here


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        return self


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    # as in vLLM: the answer starts with the last message's text where that message is of the
    # answer's role (assistant, or the last message's own without a generation prompt)
    echo: bool = False
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True  # as in vLLM
    continue_final_message: bool = False  # as in vLLM: the last (assistant) message is continued
    chat_template_kwargs: TemplateKwargs | None = None
    # as in vLLM: the chat template's reasoning_effort (GPT-OSS reads it)
    reasoning_effort: Literal["low", "medium", "high"] | None = None

    @model_validator(mode="after")
    def _chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message continues a final assistant message")
        if (
            self.continue_final_message
            and self.add_generation_prompt
            and "add_generation_prompt" in self.model_fields_set
        ):
            # (as vLLM and llama.cpp: one continues the last message, the other opens a new one;
            # left out, add_generation_prompt gives way to continue_final_message)
            raise ValueError(
                "add_generation_prompt: true and continue_final_message: true contradict each other"
            )
        check_tool_choice(self.tools, self.tool_choice)
        return self


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _completion(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.best_of is not None and self.best_of > 1 and self.stream:
            raise ValueError("best_of cannot be streamed: the best sequences are known at the end")
        if self.echo and self.truncate_prompt_tokens is not None:
            raise ValueError("echo gives the whole prompt: not with truncate_prompt_tokens")
        if self.echo and self.logprobs is not None and self.consensus > 1:
            raise ValueError("echo with logprobs scores the prompt on one route: not with consensus > 1")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts: each a string or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]
        return list(p)
