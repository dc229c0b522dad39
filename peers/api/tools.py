"""Tool calling at the OpenAI door: the messages and tools as the chat template takes them (or,
for a template without tool support, a generic tool prompt), and the model's calls read back out
of its text. Calls are written as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
blocks; tool_choice "required" or a named function forces them by grammar (inference/grammar.py)."""

import json
import uuid

from inference.grammar import parse_tool_calls
from peers.api.schema import ChatMessage, NamedTool, Tool

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


def chat_messages(messages: list[ChatMessage], text_of, generic_tools: bool) -> list[dict]:
    """Request messages -> the dicts a chat template renders. With `generic_tools` (the template
    has no tool support) earlier calls become text in the calls' own format and tool results
    user messages; otherwise they keep the shape transformers' templates take. An assistant's
    earlier thought goes to the template as `reasoning_content` (Qwen3's reads it, as in vLLM)."""
    out: list[dict] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        content = "" if m.content is None else text_of(m.content)
        if m.role == "tool":
            if generic_tools:
                answer = f"<tool_response>\n{content}\n</tool_response>"
                if out and out[-1].get("tool_results"):  # answers to one turn's calls: one message
                    out[-1]["content"] += "\n" + answer
                else:
                    out.append({"role": "user", "content": answer, "tool_results": True})
                continue
            out.append({"role": "tool", "content": content, "tool_call_id": m.tool_call_id})
            continue
        d: dict = {"role": role, "content": content}
        if m.name is not None:
            d["name"] = m.name
        if m.thought is not None:
            d["reasoning_content"] = m.thought
        if m.tool_calls:
            calls = [(c.function.name, _arguments(c.function.arguments)) for c in m.tool_calls]
            if generic_tools:
                d["content"] = "\n".join(filter(None, [content, *(_block(n, a) for n, a in calls)]))
            else:
                d["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": n, "arguments": a}}
                    for c, (n, a) in zip(m.tool_calls, calls, strict=True)
                ]
        out.append(d)
    for d in out:
        d.pop("tool_results", None)
    return out


def prompt_messages(
    messages: list[ChatMessage], tools: list[Tool], choice, takes_tools: bool, text_of
) -> tuple[list[dict], list[dict] | None]:
    """(the messages, the tools) as the chat template renders them, the one way a chat and
    /tokenize do: `tools` (none where tool_choice is "none") go to a template that `takes_tools`,
    else into the generic tool prompt. ValueError for messages that cannot be rendered."""
    generic = bool(tools) and not takes_tools
    out = chat_messages(messages, text_of, generic)
    if generic:
        return with_tool_prompt(out, tools, choice), None
    return out, template_tools(tools) if tools else None


def with_tool_prompt(messages: list[dict], tools: list[Tool], choice) -> list[dict]:
    """The generic tool prompt, joined to the system message (or one put first)."""
    prompt = tool_prompt(tools, choice)
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def tool_prompt(tools: list[Tool], choice) -> str:
    listed = "\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in tools)
    if isinstance(choice, NamedTool):
        rule = f"You must call the function {choice.function.name}."
    elif choice == "required":
        rule = "You must call at least one function."
    else:
        rule = "If no function helps, answer the user directly instead."
    return (
        "You can call these functions, described as JSON schemas:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call one, reply with its name and arguments as JSON inside tags, one block per call:\n"
        '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>\n' + rule
    )


def template_tools(tools: list[Tool]) -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in tools]


def openai_calls(calls: list[dict]) -> list[dict]:
    """Parsed calls -> message.tool_calls entries (arguments as a JSON string, as OpenAI's)."""
    return [
        {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
        }
        for c in calls
    ]


def split_calls(text: str, tools: list[Tool]) -> tuple[str | None, list[dict]]:
    """The model's text -> (content or None, calls of known functions, each once). If any block
    names no known function, it is all content; a block cut off at the end (max_tokens) is
    dropped when there are calls."""
    known = {t.function.name for t in tools}
    rest, calls = parse_tool_calls(text)
    good = [c for c in calls if c.get("name") in known and isinstance(c.get("arguments"), dict)]
    if not calls:  # (a call cut off before its end, as a forced one by max_tokens, is no content)
        return without_unfinished_call(text), []
    if len(good) != len(calls):
        return text, []
    cut = rest.rfind(OPEN)
    if cut >= 0 and CLOSE not in rest[cut:]:
        rest = rest[:cut].strip()
    unique = []
    for call in good:
        if call not in unique:
            unique.append(call)
    return rest or None, unique


def without_unfinished_call(text: str) -> str:
    """The text before a call it ends with unfinished (`<tool_call>` without its close, or the
    start of `<tool_call>` itself); the text itself where it ends with none."""
    cut = text.rfind(OPEN)
    if cut >= 0 and CLOSE not in text[cut:]:
        return text[:cut].rstrip()
    k = _partial_open(text)
    return text[:-k].rstrip() if k else text


def repeats_a_call(text: str) -> bool:
    """Whether the text's last complete call repeats an earlier one (a model looping on calls:
    its generation can end there)."""
    if not text.rstrip().endswith(CLOSE):
        return False
    _, calls = parse_tool_calls(text)
    return len(calls) > 1 and calls[-1] in calls[:-1]


class CallFilter:
    """Streams a choice's text while it is plain text; from the first `<tool_call>` on, holds it
    back (the calls go out whole at the end)."""

    def __init__(self):
        self.held = ""
        self.calling = False

    def push(self, delta: str) -> str:
        """The part of `delta` that can go out now."""
        if self.calling:
            self.held += delta
            return ""
        text = self.held + delta
        at = text.find(OPEN)
        if at >= 0:
            self.calling, self.held = True, text[at:]
            return text[:at]
        keep = _partial_open(text)  # a tag may be starting at the end
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> str:
        """What is held back, once the text is complete."""
        held, self.held = self.held, ""
        return held


def _partial_open(text: str) -> int:
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0


def _arguments(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(f"tool call arguments must be a JSON object, got {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"tool call arguments must be a JSON object, got {text[:80]!r}")
    return value


def _block(name: str, arguments: dict) -> str:
    return OPEN + "\n" + json.dumps({"name": name, "arguments": arguments}) + "\n" + CLOSE
