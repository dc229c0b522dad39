"""The Responses API's request body (POST /v1/responses), as pydantic models: the input items
(messages, function calls and their outputs, reasoning), function tools, tool_choice, text.format,
reasoning, include and vLLM's sampling extensions. A field, value or item type this server does
not serve is refused by name, never dropped; `parsed` turns pydantic's errors into a 400 naming
the parameter."""

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from peers.api.schema import MAX_TOOLS
from peers.transport.errors import InvalidRequest
from peers.transport.frames import MAX_TOP_LOGPROBS

MAX_INPUT_ITEMS = 2048
MAX_METADATA_PAIRS = 16  # as OpenAI's: 16 pairs, keys up to 64 characters, values up to 512
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
NAME = r"^[A-Za-z0-9_.-]{1,64}$"  # a function's name (as the chat path's)
TAGS = (
    "message",
    "function_call",
    "function_call_output",
    "reasoning",
    "input_text",
    "output_text",
    "refusal",
)
ItemStatus = Literal["in_progress", "completed", "incomplete"]
LOGPROBS = "message.output_text.logprobs"  # the one `include` value served: output_text's logprobs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _tag(value: Any, default: str | None = None) -> str | None:
    return value.get("type", default) if isinstance(value, dict) else getattr(value, "type", default)


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class OutputText(_Strict):
    """Text an earlier response wrote (its output items given back as input)."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] = Field(default_factory=list, max_length=0)  # (this server writes none)
    logprobs: list[Any] | None = None


class Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[
    Annotated[InputText, Tag("input_text")]
    | Annotated[OutputText, Tag("output_text")]
    | Annotated[Refusal, Tag("refusal")],
    Discriminator(_tag),
]


def text_of_parts(content: str | list[Part]) -> str:
    """A message's (or a function output's) content as text."""
    if isinstance(content, str):
        return content
    return "".join(p.refusal if isinstance(p, Refusal) else p.text for p in content)


class Message(_Strict):
    """A message: a user's, the instructions' (system, developer) or an assistant's."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCall(_Strict):
    """A call an earlier response made."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutput(_Strict):
    """A call's result, given back by the caller."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[Part]
    id: str | None = None
    status: ItemStatus | None = None


class ReasoningText(_Strict):
    type: Literal["reasoning_text"]
    text: str


class Reasoning(_Strict):
    """A thinking model's thought of an earlier turn: taken, and left out of the prompt (chat
    templates leave earlier turns' thoughts out)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Any] = Field(default_factory=list)  # (this server writes none)
    content: list[ReasoningText] | None = None
    status: ItemStatus | None = None
    encrypted_content: None = None  # (as SDKs replay an item: null, carrying nothing)

    @field_validator("encrypted_content", mode="before")
    @classmethod
    def _not_encrypted(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("this server writes no encrypted reasoning and reads none; only null is taken")
        return value


Item = Annotated[
    Annotated[Message, Tag("message")]
    | Annotated[FunctionCall, Tag("function_call")]
    | Annotated[FunctionCallOutput, Tag("function_call_output")]
    | Annotated[Reasoning, Tag("reasoning")],
    Discriminator(lambda v: _tag(v, "message")),
]


class FunctionTool(_Strict):
    """A function the model may call, in the Responses API's flat shape."""

    type: Literal["function"]
    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the call is always well-formed here: arguments follow the schema

    @model_validator(mode="before")
    @classmethod
    def _only_functions(cls, value: Any) -> Any:
        kind = _tag(value)
        if isinstance(value, dict) and kind != "function":
            raise ValueError(f"the tool type {kind!r} is not served here; only function tools are")
        return value


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    """text.format: plain text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the output always follows the schema here

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs its name and schema")
        if (
            self.type != "json_schema"
            and {"name", "schema_", "description", "strict"} & self.model_fields_set
        ):
            raise ValueError(f"a {self.type} format takes no name, schema, description or strict")
        return self


class TextConfig(_Strict):
    format: TextFormat | None = None


class ReasoningConfig(_Strict):
    """reasoning.effort: the chat template's reasoning_effort (a template that reads none refuses
    it), or "none": the thinking turned off (response_chat.thinking_off); no summaries are
    written (the thought comes whole, as a reasoning item)."""

    effort: Literal["none", "low", "medium", "high"] | None = None
    summary: None = None

    @field_validator("summary", mode="before")
    @classmethod
    def _no_summary(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(
                "no reasoning summaries are written here (the thought comes whole, as a reasoning item)"
            )
        return value


class ResponsesRequest(_Strict):
    model: str | None = None  # None: the served model (as the chat path)
    input: str | list[Item] = Field(max_length=MAX_INPUT_ITEMS)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    text: TextConfig | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    stream: bool | None = None
    user: str | None = None
    reasoning: ReasoningConfig | None = None
    truncation: Literal["disabled"] | None = None  # (a prompt past the context is a 400)
    background: bool | None = None  # (false only: answered while the request waits)
    include: list[str] | None = None  # (LOGPROBS only)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # (with include LOGPROBS)
    # vLLM's sampling extensions, as the chat path takes them (it checks their values)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = None

    @field_validator("background")
    @classmethod
    def _foreground(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("only false is served here (a response is answered while its request waits)")
        return value

    @field_validator("include")
    @classmethod
    def _included(cls, value: list[str] | None) -> list[str] | None:
        other = [v for v in value or () if v != LOGPROBS]
        if other:
            raise ValueError(f"only {LOGPROBS!r} is served here, not {other[0]!r}")
        return value

    @property
    def logprobs(self) -> bool:
        """Whether output_text carries its tokens' logprobs (include names them)."""
        return LOGPROBS in (self.include or ())

    def input_items(self) -> list[Item]:
        """The input as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [Message(role="user", content=self.input)]
        return list(self.input)


def parsed(body: Any) -> ResponsesRequest:
    """The request body, validated: its problem is a 400 naming the parameter (of a union's
    branches, the one that went deepest: a list of items is no string)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        req = ResponsesRequest.model_validate(body)
    except ValidationError as e:
        deepest = max(e.errors(), key=lambda err: len(where(err).split(".")))
        raise InvalidRequest(problem(deepest), param=where(deepest) or None) from None
    checked(req)
    return req


def checked(req: ResponsesRequest) -> None:
    """What one field says of another."""
    if req.tool_choice not in (None, "none") and not req.tools:
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    names = {t.name for t in req.tools or ()}
    if isinstance(req.tool_choice, ToolChoiceFunction) and req.tool_choice.name not in names:
        raise InvalidRequest(
            f"tool_choice names {req.tool_choice.name!r}, which is not among the tools", param="tool_choice"
        )
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest(f"top_logprobs needs include: [{LOGPROBS!r}]", param="top_logprobs")
    pairs = (req.metadata or {}).items()
    if len(pairs) > MAX_METADATA_PAIRS or any(
        len(k) > MAX_METADATA_KEY_CHARS or len(v) > MAX_METADATA_VALUE_CHARS for k, v in pairs
    ):
        raise InvalidRequest(
            f"metadata holds at most {MAX_METADATA_PAIRS} pairs, keys up to {MAX_METADATA_KEY_CHARS} "
            f"characters, values up to {MAX_METADATA_VALUE_CHARS}",
            param="metadata",
        )


def where(error: dict) -> str:
    """The dotted path of a pydantic error: field names and list positions (a union's branch
    labels, such as `str` or `list[...]`, and an item's tag left out)."""
    loc = list(error.get("loc", ()))
    if error.get("type") == "union_tag_invalid" and loc and loc[-1] == error.get("ctx", {}).get("tag"):
        loc = loc[:-1]
    kept: list = []
    for part in loc:
        if isinstance(part, int) or not (
            _branch(part) or (kept and isinstance(kept[-1], int) and part in TAGS)
        ):
            kept.append(part)
    return ".".join(str(p) for p in kept)


def _branch(part: str) -> bool:
    return "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "dict")


def problem(error: dict) -> str:
    """A pydantic error as a sentence naming the parameter."""
    at, kind, ctx = where(error), error.get("type"), error.get("ctx", {})
    if kind == "extra_forbidden":
        return f"this server does not implement the parameter {at!r} of the Responses API; remove it"
    if kind == "union_tag_invalid":
        return f"{at}: the type {ctx.get('tag')!r} is not served here; one of {ctx.get('expected_tags')}"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{at}: {message}" if at else message
