"""Tool calling without a network: messages for templates with and without tool support, the
generic tool prompt, calls read back out of text, and the stream filter that holds calls back."""

import json

from transformers import AutoTokenizer

from inference import Tokenizer
from peers.api.prompts import text_of
from peers.api.schema import ChatMessage, NamedTool, Tool
from peers.api.tools import CallFilter, chat_messages, split_calls, template_tools, with_tool_prompt

WEATHER = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
)
HISTORY = [
    ChatMessage(role="user", content="Weather in Paris and Rome?"),
    ChatMessage.model_validate(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                },
            ],
        }
    ),
    ChatMessage(role="tool", content="sunny", tool_call_id="c1"),
    ChatMessage(role="tool", content="rain", tool_call_id="c2"),
]


def test_a_template_without_tools_gets_the_calls_as_text_and_one_answer_turn():
    messages = chat_messages(HISTORY, text_of, generic_tools=True)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]  # roles still alternate
    call = messages[1]["content"].split("\n</tool_call>")[0].split("<tool_call>\n")[1]
    assert json.loads(call) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert (
        messages[2]["content"]
        == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
    )
    prompted = with_tool_prompt(
        messages,
        [WEATHER],
        NamedTool.model_validate({"type": "function", "function": {"name": "get_weather"}}),
    )
    assert prompted[0]["role"] == "system" and '"name": "get_weather"' in prompted[0]["content"]
    assert "You must call the function get_weather." in prompted[0]["content"]


def test_a_template_with_tools_renders_them_itself(tiny_llama):
    tokenizer = Tokenizer(
        tiny_llama,
        chat_template=(
            "{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
            "{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}"
            "{% for c in m.tool_calls %}call {{ c.function.name }} {{ c.function.arguments.city }};{% endfor %}"
            "{% else %}{{ m.content }}{% endif %}|{% endfor %}"
        ),
    )
    assert tokenizer.template_takes_tools
    messages = chat_messages(HISTORY, text_of, generic_tools=False)
    assert messages[1]["tool_calls"][1]["function"]["arguments"] == {"city": "Rome"}
    ids = tokenizer.encode_chat(messages, tools=template_tools([WEATHER]))
    text = AutoTokenizer.from_pretrained(tiny_llama).decode(ids)
    assert "[tool get_weather]" in text
    assert "assistant:call get_weather Paris;call get_weather Rome;|tool:sunny|tool:rain|" in text


def test_calls_are_read_out_of_text():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = split_calls(text, [WEATHER])
    assert content == "Let me check." and calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    unknown = '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>'
    assert split_calls(unknown, [WEATHER]) == (unknown, [])  # no such tool: it stays text
    assert split_calls("just text", [WEATHER]) == ("just text", [])


def test_the_stream_filter_sends_text_and_holds_calls_back():
    f = CallFilter()
    out = [f.push(d) for d in ["Hello <", "to", "ol", "_call>\n{", '"name": 1}']]
    assert "".join(out) == "Hello "
    assert f.finish() == '<tool_call>\n{"name": 1}'
    g = CallFilter()
    assert g.push("a <to") == "a " and g.push("y") == "<toy" and g.finish() == ""


def test_a_looping_model_is_stopped_and_its_calls_kept_once():
    from peers.api.tools import repeats_a_call

    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    two = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    assert not repeats_a_call(one) and not repeats_a_call(one + "\n" + two)
    assert repeats_a_call(one + "\n" + two + "\n" + one)
    cut = one + "\n" + two + "\n" + one + '\n<tool_call>\n{"name": "get_wea'
    content, calls = split_calls(cut, [WEATHER])
    assert content is None  # the cut-off block is no content
    assert calls == [{"name": "get_weather", "arguments": {"city": c}} for c in ("Oslo", "Rome")]
