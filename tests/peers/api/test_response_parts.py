"""The Responses API's parts without a model: a request's refusals by name (response_schema.py),
its translation to the chat path (response_chat.py), and the Response built from run events
(response_events.py): reasoning and message items, tool calls held back, event order and
sequence numbers, an empty answer, a cut one."""

import json

import pytest

from peers.api.events import Delta, Finish, Stepped
from peers.api.response_chat import chat_request, renamed
from peers.api.response_events import ResponseBuilder, response_usage, sse_bytes
from peers.api.response_schema import parsed
from peers.api.schema import Tool
from peers.entry.generation import Token
from peers.transport.errors import InvalidRequest

WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def request(**kw) -> dict:
    return {"model": "m", "input": "hi", **kw}


@pytest.mark.parametrize(
    ("body", "param", "named"),
    [
        (request(include=["x"]), "include", "'include'"),
        (request(prompt_cache_key="k"), "prompt_cache_key", "'prompt_cache_key'"),
        (request(tools=[{"type": "file_search"}]), "tools.0", "'file_search'"),
        (request(input=[{"type": "item_reference", "id": "x"}]), "input.0", "'item_reference'"),
        (
            request(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]),
            "input.0.content.0",
            "'input_file'",
        ),
        (
            request(tool_choice={"type": "web_search_preview"}, tools=[WEATHER]),
            "tool_choice.type",
            "'function'",
        ),
        (request(tool_choice="required"), "tool_choice", "needs tools"),
        (
            request(tool_choice={"type": "function", "name": "other"}, tools=[WEATHER]),
            "tool_choice",
            "'other'",
        ),
        (request(reasoning={"summary": "auto"}), "reasoning.summary", "no reasoning summaries"),
        (request(text={"format": {"type": "json_schema", "name": "x"}}), "text.format", "name and schema"),
        (request(truncation="auto"), "truncation", "'disabled'"),
        (request(metadata={f"k{i}": "v" for i in range(17)}), "metadata", "16 pairs"),
        (request(input=7), "input", "valid string"),
    ],
)
def test_a_request_is_refused_by_the_parameter_at_fault(body, param, named):
    with pytest.raises(InvalidRequest) as caught:
        parsed(body)
    assert caught.value.param == param and named in caught.value.message, caught.value.message


def test_a_body_that_is_no_object_is_refused():
    with pytest.raises(InvalidRequest, match="a JSON object"):
        parsed(["model", "input"])


def test_items_become_chat_messages():
    items = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "hm"}],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
        },
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {
            "type": "function_call",
            "call_id": "call_2",
            "name": "get_weather",
            "arguments": '{"city": "Lyon"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
        {
            "type": "function_call_output",
            "call_id": "call_2",
            "output": [{"type": "input_text", "text": "19 C"}],
        },
    ]
    req = parsed(
        request(input=items, instructions="You help.", tools=[WEATHER], max_output_tokens=7, top_p=0.5)
    )
    chat = chat_request(req, req.input_items())
    shapes = [(m.role, m.content, [c.id for c in m.tool_calls or ()], m.tool_call_id) for m in chat.messages]
    assert shapes == [
        ("system", "You help.", [], None),
        ("developer", "Be brief.", [], None),
        ("user", "Weather in Paris?", [], None),
        ("assistant", "Let me look.", ["call_1", "call_2"], None),  # (the thought left out)
        ("tool", "21 C", [], "call_1"),
        ("tool", "19 C", [], "call_2"),
    ]
    assert (chat.max_completion_tokens, chat.top_p, chat.tools[0].function.name) == (7, 0.5, "get_weather")
    assert "temperature" not in chat.model_fields_set  # (unset: the model's own sampling)


def test_text_format_and_tool_choice_take_the_chat_shapes():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "name": "a", "schema": schema, "strict": True}
    req = parsed(
        request(
            text={"format": fmt}, tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}
        )
    )
    chat = chat_request(req, req.input_items())
    assert chat.response_format.json_schema.schema_ == schema and chat.response_format.json_schema.name == "a"
    assert chat.tool_choice.function.name == "get_weather"


def test_the_chat_paths_errors_name_the_responses_parameters():
    error = renamed(InvalidRequest("response_format: the schema loops", param="response_format"))
    assert (error.param, error.message) == ("text.format", "text.format: the schema loops")
    error = renamed(InvalidRequest("too long", param="messages", code="context_length_exceeded"))
    assert (error.param, error.code) == ("input", "context_length_exceeded")


def built(events: list, tools: list | None = None) -> tuple[list[dict], dict]:
    builder = ResponseBuilder("resp_x", "m", {"store": True}, tools or [])
    out = builder.opening()
    for event in events:
        out += builder.of(event)
    out += builder.closing(response_usage(USAGE, builder.reasoning_tokens))
    return out, builder.body()


def delta(text: str, reasoning: str = "", tokens: int = 1) -> Delta:
    return Delta(0, text, tuple(Token(1, 0.0) for _ in range(tokens)), reasoning)


def test_a_thought_then_text_make_a_reasoning_item_and_a_message():
    events, body = built(
        [delta("", "Paris is", 2), Stepped(), delta("", " the capital."), delta("Paris."), Finish(0, "stop")]
    )
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    thought, message = body["output"]
    assert thought["content"] == [{"type": "reasoning_text", "text": "Paris is the capital."}]
    assert message["content"][0]["text"] == "Paris." and message["status"] == "completed"
    assert body["usage"]["output_tokens_details"] == {"reasoning_tokens": 3}
    assert events[-1]["response"] == body and body["status"] == "completed"


def test_calls_are_held_back_and_come_as_function_call_items():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    tools = [Tool.model_validate({"type": "function", "function": {"name": "get_weather"}})]
    events, body = built([delta("Looking. "), delta(call[:20]), delta(call[20:]), Finish(0, "stop")], tools)
    texts = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(texts) == "Looking. " and "<" not in "".join(texts)
    message, fc = body["output"]
    assert message["content"][0]["text"] == "Looking. "  # (as streamed: the text before the call)
    assert (fc["type"], fc["name"], json.loads(fc["arguments"]), fc["status"]) == (
        "function_call",
        "get_weather",
        {"city": "Paris"},
        "completed",
    )
    args = [e for e in events if e["type"].startswith("response.function_call_arguments")]
    assert [a["item_id"] for a in args] == [fc["id"]] * 2 and args[-1]["arguments"] == fc["arguments"]


def test_an_empty_answer_is_an_empty_message_and_a_cut_one_is_incomplete():
    _, body = built([Finish(0, "stop")])
    (message,) = body["output"]
    assert message["content"][0]["text"] == "" and body["status"] == "completed"
    events, body = built([delta("Par"), Finish(0, "length")])
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and events[-1]["type"] == "response.incomplete"


def test_an_event_is_sent_under_its_own_type():
    event = {"type": "response.output_text.delta", "sequence_number": 4, "delta": "a"}
    assert (
        sse_bytes(event)
        == b"event: response.output_text.delta\ndata: " + json.dumps(event).encode() + b"\n\n"
    )
