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


class Template:
    """A tokenizer as the Responses path reads its chat template: the text, and its variables."""

    def __init__(self, text: str, variables: frozenset[str] = frozenset()):
        self.chat_template, self.template_variables = text, variables

    def vocab_ids(self, *names: str) -> dict[str, int]:
        return {n: i for i, n in enumerate(names)}


PLAIN = Template("{{ messages }}")  # a model that does not think
THINKS = Template("{{ messages }}<think></think>")  # one that does, and cannot be told not to
SWITCHED = Template("{{ messages }}<think></think>", frozenset({"enable_thinking"}))


def request(**kw) -> dict:
    return {"model": "m", "input": "hi", **kw}


@pytest.mark.parametrize(
    ("body", "param", "named"),
    [
        (request(include=["x"]), "include", "not 'x'"),
        (
            request(include=["message.output_text.logprobs", "reasoning.encrypted_content"]),
            "include",
            "'reasoning",
        ),
        (request(top_logprobs=2), "top_logprobs", "needs include"),
        (request(top_logprobs=21, include=["message.output_text.logprobs"]), "top_logprobs", "20"),
        (request(background=True), "background", "only false"),
        (
            request(input=[{"type": "reasoning", "summary": [], "encrypted_content": "gAAA"}]),
            "input.0.encrypted_content",
            "only null",
        ),
        (request(reasoning={"effort": "minimal"}), "reasoning.effort", "'none'"),
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
    chat = chat_request(req, req.input_items(), PLAIN)
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
    chat = chat_request(req, req.input_items(), PLAIN)
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


def test_vllms_forms_of_a_request_are_taken():
    """background false, a replayed reasoning item with a null encrypted_content, the sampling
    extensions (passed to the chat path as they are), include's logprobs (the chat's logprobs)."""
    replayed = [
        {"role": "user", "content": "hi"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        {"type": "reasoning", "id": "rs_1", "status": "completed", "summary": [], "encrypted_content": None},
        {"role": "user", "content": "Again?"},
    ]
    extras = {
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "seed": 42,
        "stop": ["\n\n"],
        "logit_bias": {"7": -100.0},
        "ignore_eos": True,
    }
    req = parsed(request(input=replayed, background=False, **extras))
    chat = chat_request(req, req.input_items(), PLAIN)
    assert [m.role for m in chat.messages] == ["user", "assistant", "user"]  # (the thought left out)
    assert {k: getattr(chat, k) for k in extras} == extras and chat.logprobs is False
    req = parsed(request(include=["message.output_text.logprobs"], top_logprobs=3))
    chat = chat_request(req, req.input_items(), PLAIN)
    assert (chat.logprobs, chat.top_logprobs) == (True, 3)
    req = parsed(request(top_k=-1))
    with pytest.raises(InvalidRequest) as caught:  # (the chat path checks the values, by name)
        chat_request(req, req.input_items(), PLAIN)
    assert caught.value.param == "top_k"


def test_effort_none_turns_the_thinking_off_or_is_refused():
    """Where the template reads enable_thinking, "none" sets it false; a model that does not think
    has nothing to turn off; one that thinks and cannot be told not to refuses it by name."""
    req = parsed(request(reasoning={"effort": "none"}))
    switched = chat_request(req, req.input_items(), SWITCHED)
    assert switched.chat_template_kwargs == {"enable_thinking": False} and switched.reasoning_effort is None
    plain = chat_request(req, req.input_items(), PLAIN)
    assert plain.chat_template_kwargs is None and plain.reasoning_effort is None
    with pytest.raises(InvalidRequest) as caught:
        chat_request(req, req.input_items(), THINKS)
    assert caught.value.param == "reasoning.effort" and "enable_thinking" in caught.value.message


def scored(tokens) -> list[dict]:
    return [
        {"token": chr(t.token), "logprob": t.logprob, "bytes": [t.token], "top_logprobs": []} for t in tokens
    ]


def test_output_text_carries_its_tokens_logprobs():
    """With include's logprobs, each output_text delta carries its tokens' (those of text held back
    with it included), the part and the done event all of them; a thought's tokens and a call's
    carry none."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    tools = [Tool.model_validate({"type": "function", "function": {"name": "get_weather"}})]
    events = [
        Delta(0, "", (Token(ord("t"), -0.5),), "thinking"),
        Delta(0, "", (Token(ord("h"), -0.25),)),  # (held back: no text yet)
        Delta(0, "Hi", (Token(ord("H"), -0.1), Token(ord("i"), -0.2))),
        Delta(0, " you", (Token(ord("y"), -0.3),)),
        Delta(0, call, (Token(ord("<"), -0.4),)),
        Finish(0, "stop"),
    ]
    builder = ResponseBuilder("resp_x", "m", {}, tools, scored)
    out = [e for event in events for e in builder.of(event)]
    out += builder.closing(response_usage(USAGE, builder.reasoning_tokens))
    deltas = [[lp["token"] for lp in e["logprobs"]] for e in out if e["type"] == "response.output_text.delta"]
    assert deltas == [["h", "H", "i"], ["y"]]
    (done,) = [e for e in out if e["type"] == "response.output_text.done"]
    thought, message, fc = builder.body()["output"]
    assert [lp["token"] for lp in message["content"][0]["logprobs"]] == ["h", "H", "i", "y"]
    assert done["logprobs"] == message["content"][0]["logprobs"] and fc["type"] == "function_call"
    plain, _ = built([delta("Hi", tokens=2), Finish(0, "stop")])  # (not asked: empty lists, as OpenAI's)
    assert all(e["logprobs"] == [] for e in plain if e["type"].startswith("response.output_text"))
