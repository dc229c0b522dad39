"""A Response object (the Responses API's answer) built from a run's events, and the server-sent
events that stream it, with OpenAI's event types and increasing sequence numbers. A whole answer
is built by the same steps, its events left unsent, so whole and streamed answers are the same."""

import copy
import json
import time
import uuid
from collections.abc import Callable, Sequence

from peers.api.events import Delta, Event, Finish
from peers.api.tools import CallFilter, openai_calls, split_calls
from peers.entry.generation import Token
from peers.transport.errors import SwarmError

# the parts of an open item, by its type: (its content part's type, its text events' prefix)
PARTS = {
    "message": ("output_text", "response.output_text"),
    "reasoning": ("reasoning_text", "response.reasoning_text"),
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


Scored = Callable[[Sequence[Token]], list[dict]]  # tokens -> their logprobs, as output_text gives them


def sse_bytes(event: dict) -> bytes:
    """One event as OpenAI sends it: its type as the SSE event name, itself as the data."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def response_usage(usage: dict, reasoning_tokens: int) -> dict:
    """The chat path's usage in the Responses API's shape."""
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": usage["total_tokens"],
    }


class ResponseBuilder:
    """One response's output items as its events come: a thought becomes a reasoning item, text a
    message item, tool calls (held back from the text until it ends) function_call items.
    `echoed`: the request's parameters the Response object repeats; `scored` (include's
    logprobs): the logprobs of a message's tokens, on its output_text and its text events."""

    def __init__(self, rid: str, model: str, echoed: dict, tools: list, scored: Scored | None = None):
        self.rid, self.model, self.echoed, self.tools = rid, model, echoed, tools
        self.scored = scored
        self.pending: list[dict] = []  # the logprobs of tokens whose text is not written yet
        self.scores: list[dict] = []  # the open message's logprobs
        self.created_at = int(time.time())
        self.calls = CallFilter() if tools else None
        self.output: list[dict] = []
        self.open: dict | None = None  # the item being written (a message or a reasoning item)
        self.text: list[str] = []  # the open item's text so far
        self.sequence = 0
        self.finish = "length"
        self.status = "in_progress"
        self.usage: dict | None = None
        self.reasoning_tokens = 0

    def event(self, kind: str, **fields) -> dict:
        out = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return out

    def body(self) -> dict:
        """The Response object as it stands."""
        incomplete = {"reason": "max_output_tokens"} if self.status == "incomplete" else None
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": None,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": copy.deepcopy(self.output),
            "usage": self.usage,
            **self.echoed,
        }

    def opening(self) -> list[dict]:
        return [self.event(k, response=self.body()) for k in ("response.created", "response.in_progress")]

    def of(self, event: Event) -> list[dict]:
        """The events that a run's event brings."""
        out: list[dict] = []
        if isinstance(event, Delta):
            if event.reasoning:
                self.reasoning_tokens += len(event.tokens)
                out += self._write("reasoning", event.reasoning)
                self.pending = []  # (tokens held back so far were the thought's)
            if self.scored is not None and (event.text or not event.reasoning):
                self.pending += self.scored(event.tokens)
            text = self.calls.push(event.text) if self.calls is not None else event.text
            if text:
                out += self._write("message", text)
        elif isinstance(event, Finish):
            self.finish = event.reason
        return out

    def closing(self, usage: dict) -> list[dict]:
        """The last events, once the run has ended: the held-back text and calls, the open item
        closed, and response.completed (or response.incomplete: cut off by max_output_tokens)."""
        out: list[dict] = []
        calls: list[dict] = []
        if self.calls is not None:
            rest, calls = split_calls(self.calls.finish(), self.tools)
            if calls:  # (held back with the calls, their tokens and the text's beside them: no logprobs)
                self.pending = []
            if rest:
                out += self._write("message", rest)
        cut = self.finish == "length"
        if not calls and not self.output:  # (nothing written: an empty message)
            out += self._open("message")
        out += self._close("incomplete" if cut else "completed")
        for call in openai_calls(calls):
            out += self._call(call)
        self.status, self.usage = ("incomplete" if cut else "completed"), usage
        return [*out, self.event(f"response.{self.status}", response=self.body())]

    def error(self, error: SwarmError) -> dict:
        """The error event that ends a stream that failed once started."""
        self.status = "failed"
        return self.event("error", code=error.code or error.kind, message=error.message, param=error.param)

    def _write(self, kind: str, text: str) -> list[dict]:
        out = []
        if self.open is not None and self.open["type"] != kind:
            out += self._close("completed")
        if self.open is None:
            out += self._open(kind)
        index, (_, prefix) = len(self.output) - 1, PARTS[kind]
        self.text.append(text)
        extra = {}
        if kind == "message":  # (the tokens so far: the text held back with a call's comes later)
            extra["logprobs"], self.pending = self.pending, []
            self.scores += extra["logprobs"]
        delta = self.event(f"{prefix}.delta", item_id=self.open["id"], output_index=index, content_index=0)
        return [*out, {**delta, "delta": text, **extra}]

    def _open(self, kind: str) -> list[dict]:
        if kind == "message":
            item = {
                "type": "message",
                "id": new_id("msg"),
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
        else:
            item = {
                "type": "reasoning",
                "id": new_id("rs"),
                "status": "in_progress",
                "summary": [],
                "content": [],
            }
        self.open, self.text, self.scores = item, [], []
        self.output.append(item)
        index = len(self.output) - 1
        return [
            self.event("response.output_item.added", output_index=index, item=copy.deepcopy(item)),
            self.event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=self._part(kind, ""),
            ),
        ]

    def _part(self, kind: str, text: str, scores: list[dict] | None = None) -> dict:
        part_type, _ = PARTS[kind]
        if kind == "message":
            return {"type": part_type, "text": text, "annotations": [], "logprobs": scores or []}
        return {"type": part_type, "text": text}

    def _close(self, status: str) -> list[dict]:
        item = self.open
        if item is None:
            return []
        kind, index, text = item["type"], len(self.output) - 1, "".join(self.text)
        part, (_, prefix) = self._part(kind, text, self.scores), PARTS[kind]
        item["content"], item["status"] = [part], status
        self.open, self.text = None, []
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        done = {**self.event(f"{prefix}.done", **where), "text": text}
        if kind == "message":
            done["logprobs"] = copy.deepcopy(self.scores)
        return [
            done,
            self.event("response.content_part.done", **where, part=copy.deepcopy(part)),
            self.event("response.output_item.done", output_index=index, item=copy.deepcopy(item)),
        ]

    def _call(self, call: dict) -> list[dict]:
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        item = {
            "type": "function_call",
            "id": new_id("fc"),
            "call_id": call["id"],
            "name": name,
            "arguments": "",
            "status": "in_progress",
        }
        self.output.append(item)
        index = len(self.output) - 1
        where = {"item_id": item["id"], "output_index": index}
        out = [
            self.event("response.output_item.added", output_index=index, item=copy.deepcopy(item)),
            self.event("response.function_call_arguments.delta", **where, delta=arguments),
            self.event("response.function_call_arguments.done", **where, name=name, arguments=arguments),
        ]
        item["arguments"], item["status"] = arguments, "completed"
        return [*out, self.event("response.output_item.done", output_index=index, item=copy.deepcopy(item))]
