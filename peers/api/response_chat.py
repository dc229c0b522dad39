"""A Responses API request as the chat path's request: instructions and input items become chat
messages (function calls an assistant's tool_calls, their outputs tool messages), the flat
function tools, tool_choice, text.format, reasoning.effort and include's logprobs the chat's
shapes, vLLM's sampling extensions passed as they are; and the chat path's errors named by the
Responses API's parameters."""

from pydantic import ValidationError

from peers.api.reasoning import reasoning_of
from peers.api.response_schema import (
    FunctionCall,
    FunctionCallOutput,
    Item,
    Message,
    Reasoning,
    ResponsesRequest,
    TextFormat,
    ToolChoiceFunction,
    text_of_parts,
)
from peers.api.schema import ChatRequest
from peers.transport.errors import InvalidRequest, SwarmError

# the chat path's parameters -> the Responses API's that gave them
PARAMS = {
    "messages": "input",
    "response_format": "text.format",
    "max_completion_tokens": "max_output_tokens",
    "reasoning_effort": "reasoning.effort",
}
# vLLM's sampling extensions, the same on both paths
SAMPLING = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "logit_bias",
    "ignore_eos",
)


def chat_messages_of(items: list[Item]) -> list[dict]:
    """Input items -> chat messages. Function calls join the assistant message before them (or
    open one), their outputs are tool messages; a reasoning item is left out (the chat template
    would leave an earlier turn's thought out)."""
    out: list[dict] = []
    for item in items:
        if isinstance(item, Message):
            out.append({"role": item.role, "content": text_of_parts(item.content)})
        elif isinstance(item, FunctionCall):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutput):
            out.append({"role": "tool", "content": text_of_parts(item.output), "tool_call_id": item.call_id})
        else:
            assert isinstance(item, Reasoning), item
    return out


def response_format(fmt: TextFormat | None) -> dict | None:
    """text.format -> the chat path's response_format."""
    if fmt is None:
        return None
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
    return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}


def thinking_off(tokenizer) -> dict:
    """reasoning.effort "none": the chat template's variables that turn the thinking off
    (enable_thinking false where the template reads it; none for a model that does not think).
    A model that thinks and whose template cannot turn it off refuses it."""
    if "enable_thinking" in tokenizer.template_variables:
        return {"enable_thinking": False}
    if reasoning_of(tokenizer) is None:
        return {}
    raise InvalidRequest(
        "reasoning.effort: 'none' turns the thinking off, and this model's chat template cannot "
        "(it reads no enable_thinking)",
        param="reasoning.effort",
    )


def chat_body(req: ResponsesRequest, items: list[Item], tokenizer) -> dict:
    """The chat request's body: the instructions first (a system message), then the items;
    `tokenizer`: the model's, whose chat template says how reasoning.effort "none" is told."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    messages += chat_messages_of(items)
    if not messages:
        raise InvalidRequest("input must hold at least one item", param="input")
    body: dict = {"model": req.model, "messages": messages, "stream": bool(req.stream)}
    effort = req.reasoning.effort if req.reasoning else None
    optional = {
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": response_format(req.text.format if req.text else None),
        "reasoning_effort": effort if effort != "none" else None,
        "chat_template_kwargs": (thinking_off(tokenizer) or None) if effort == "none" else None,
        **{name: getattr(req, name) for name in SAMPLING},
    }
    if req.logprobs:
        optional.update(logprobs=True, top_logprobs=req.top_logprobs or 0)
    body.update({k: v for k, v in optional.items() if v is not None})  # (unset: the model's own)
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in req.tools
        ]
    if isinstance(req.tool_choice, ToolChoiceFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    return body


def chat_request(req: ResponsesRequest, items: list[Item], tokenizer) -> ChatRequest:
    """The chat path's request for `req` over the conversation `items` (`tokenizer`: the
    model's)."""
    try:
        return ChatRequest.model_validate(chat_body(req, items, tokenizer))
    except ValidationError as e:
        first = e.errors()[0]
        param = str(first["loc"][0]) if first.get("loc") else None
        param = PARAMS.get(param, param)
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise InvalidRequest(f"{param}: {message}" if param else message, param=param) from None


def renamed(error: SwarmError) -> SwarmError:
    """The chat path's error, naming the Responses API's parameter where the chat's differs
    (response_format -> text.format); the same error, changed in place."""
    if error.param in PARAMS:
        param = PARAMS[error.param]
        error.message = error.message.replace(f"{error.param}:", f"{param}:", 1)
        error.param, error.args = param, (error.message,)
    return error
