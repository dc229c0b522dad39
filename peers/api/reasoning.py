"""Reasoning models' thinking, told apart from their answer as they write it: think tags
(`<think>...</think>`, as Qwen3 and DeepSeek-R1 write them) or GPT-OSS's harmony channels
(`<|channel|>analysis<|message|>...<|end|>`, then `<|start|>assistant<|channel|>final<|message|>...`).
The format is read off the chat template and the vocabulary (`reasoning_of`); where the prompt
has already opened the thinking (a generation prompt ending in `<think>`), the output starts inside
it. A parser takes a sequence's text piece by piece and gives back (reasoning, content)."""

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from peers.api.textstream import partial_tail

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
START, CHANNEL, MESSAGE, END, RETURN, CALL = (
    "<|start|>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
)
HARMONY_MARKERS = (START, CHANNEL, MESSAGE, END, RETURN, CALL, "<|constrain|>")
HARMONY_ENDS = (END, RETURN, CALL, START)  # what ends a message's body
PROMPT_TAIL_TOKENS = 256  # the end of the prompt read to see where the output starts
RECIPIENT = re.compile(r"to=([^\s<]+)")


@dataclass(frozen=True)
class Reasoning:
    """A chat template's thinking format, "think" or "harmony"; `keep`: the ids of its markers,
    kept in the decoded text even where they are special tokens."""

    format: str
    keep: frozenset[int]

    def start(self, prompt_tail: str) -> "ReasoningStart":
        """Where the output of a prompt ending in `prompt_tail` (decoded keeping the markers)
        starts."""
        if self.format == "think":
            # only a generation prompt that ends by opening the thought (a user may write "<think>")
            return ReasoningStart(self.format, prompt_tail.rstrip().endswith(THINK_OPEN))
        last_start = prompt_tail.rfind(START)
        last_message = prompt_tail.rfind(MESSAGE)
        last_end = max(prompt_tail.rfind(m) for m in (END, RETURN, CALL))
        if last_message > max(last_start, last_end):  # the prompt opened a message's body
            header = prompt_tail[max(last_start, 0) : last_message]
            return ReasoningStart(self.format, channel_of(header) == "analysis", header)
        return ReasoningStart(self.format, False)


@dataclass(frozen=True)
class ReasoningStart:
    """Where one prompt's output starts: `inside` the thinking or not; for harmony, `header`:
    the header of the message the prompt opened (None: the output writes its own)."""

    format: str
    inside: bool
    header: str | None = None

    def parser(self) -> "ThinkParser | HarmonyParser":
        if self.format == "think":
            return ThinkParser(self.inside)
        return HarmonyParser(self.header)


@lru_cache(maxsize=16)
def reasoning_of(tokenizer) -> Reasoning | None:
    """The thinking format of `tokenizer`'s chat template: harmony where the vocabulary has its
    markers and the template writes channels, think tags where the template writes `</think>`;
    None for a model that does not think."""
    template = getattr(tokenizer, "chat_template", "")
    if CHANNEL in template:
        ids = tokenizer.vocab_ids(*HARMONY_MARKERS)
        if all(m in ids for m in (START, CHANNEL, MESSAGE, END)):
            return Reasoning("harmony", frozenset(ids.values()))
    if THINK_CLOSE in template:
        return Reasoning("think", frozenset(tokenizer.vocab_ids(THINK_OPEN, THINK_CLOSE).values()))
    return None


def channel_of(header: str) -> str:
    """The channel a harmony header names ("" for none)."""
    at = header.find(CHANNEL)
    if at < 0:
        return ""
    words = header[at + len(CHANNEL) :].split("<|")[0].split()
    return words[0] if words else ""


class ThinkParser:
    """Think tags: text from a leading `<think>` (or from the start, `inside`) to `</think>` is
    reasoning, the rest content (its leading whitespace dropped). A missing `</think>` leaves it
    all reasoning; a `<think>` after the start is content."""

    def __init__(self, inside: bool):
        self.state = "thinking" if inside else "opening"
        self.held = ""

    def push(self, text: str) -> tuple[str, str]:
        self.held += text
        reasoning = content = ""
        while self.held:
            if self.state == "opening":
                lead = self.held.lstrip()
                if lead.startswith(THINK_OPEN):
                    self.held, self.state = lead[len(THINK_OPEN) :], "thinking"
                elif THINK_OPEN.startswith(lead):
                    break  # a `<think>` may be arriving
                else:
                    self.state = "answering"
            elif self.state == "thinking":
                at = self.held.find(THINK_CLOSE)
                if at >= 0:
                    reasoning += self.held[:at]
                    self.held, self.state = self.held[at + len(THINK_CLOSE) :], "closed"
                    continue
                keep = partial_tail(self.held, (THINK_CLOSE,))
                reasoning += self.held[: len(self.held) - keep]
                self.held = self.held[len(self.held) - keep :]
                break
            elif self.state == "closed":  # the whitespace between thinking and answer
                self.held = self.held.lstrip()
                if self.held:
                    self.state = "answering"
            else:
                content, self.held = content + self.held, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is held back, once the text is complete."""
        held, self.held = self.held, ""
        if self.state == "thinking":
            return held, ""
        return "", held if self.state != "closed" else ""


class HarmonyParser:
    """Harmony messages: the analysis channel is reasoning, the others content; a commentary
    message to `functions.NAME` is a tool call, given as content in the door's own call blocks
    (peers/api/tools.py). Output that does not open with a header is plain content. `header`: the
    header of a message the prompt opened (None: the output starts with its own header)."""

    def __init__(self, header: str | None):
        self.held = ""
        self.header = header if header is not None else ""
        self.state = "body" if header is not None else "fresh"
        self.call = ""  # a tool call's arguments so far

    def push(self, text: str) -> tuple[str, str]:
        self.held += text
        out = {"reasoning": "", "content": ""}
        while self.held and self._step(out):
            pass
        return out["reasoning"], out["content"]

    def _step(self, out: dict) -> bool:
        """Take what the held text allows in the current state; False when more must come."""
        if self.state == "plain":
            out["content"] += self.held
            self.held = ""
            return False
        if self.state == "fresh":  # a header opens with one of these, or this is plain text
            if not any(self.held.startswith(m) for m in (CHANNEL, START)):
                if any(m.startswith(self.held) for m in (CHANNEL, START)):
                    return False
                self.state = "plain"
                return True
            self.state = "header"
        if self.state == "header":
            at = self.held.find(MESSAGE)
            if at < 0:
                return False
            self.header += self.held[:at]
            self.held, self.state = self.held[at + len(MESSAGE) :], "body"
            return True
        ends = [(at, m) for m in HARMONY_ENDS if (at := self.held.find(m)) >= 0]
        if ends:
            at, marker = min(ends)
            self._body(self.held[:at], out, complete=True)
            self.held = self.held[at + (0 if marker == START else len(marker)) :]
            self.header, self.state = "", "header"
            return True
        keep = partial_tail(self.held, HARMONY_ENDS)
        self._body(self.held[: len(self.held) - keep], out, complete=False)
        self.held = self.held[len(self.held) - keep :]
        return False

    def _body(self, text: str, out: dict, complete: bool) -> None:
        recipient = RECIPIENT.search(self.header)
        if recipient and recipient.group(1).startswith("functions."):
            self.call += text
            if complete:
                name = recipient.group(1).removeprefix("functions.")
                block = '{"name": ' + json.dumps(name) + ', "arguments": ' + self.call.strip() + "}"
                out["content"] += f"<tool_call>\n{block}\n</tool_call>"
                self.call = ""
            return
        out["reasoning" if channel_of(self.header) == "analysis" else "content"] += text

    def finish(self) -> tuple[str, str]:
        """What is held back, once the text is complete (a header cut off is dropped)."""
        out = {"reasoning": "", "content": ""}
        if self.state in ("plain", "fresh"):
            out["content"] = self.held
        elif self.state == "body":
            self._body(self.held, out, complete=True)
        self.held = ""
        return out["reasoning"], out["content"]
