"""The OpenAI response shapes: whole chat and text completions, their streamed chunks (as
peers/api/sse.py sends them), logprobs in both endpoints' forms, and tool calls read out of the
text."""

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from inference.sampling import PositionScore
from peers.api.tools import openai_calls, split_calls
from peers.entry.generation import Token


@dataclass
class Choice:
    """One choice of a whole (not streamed) answer."""

    index: int
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)  # a thinking model's thought
    tokens: list[Token] = field(default_factory=list)
    finish: str = "length"
    echo: str = ""
    prompt_ids: tuple[int, ...] = ()  # with prompt logprobs: the prompt, and its scores
    scores: tuple[PositionScore, ...] = ()
    ids: list[int] = field(default_factory=list)  # every token id it generated, its stop id too
    prompt: list[int] = field(default_factory=list)  # its prompt's token ids (return_token_ids)


def fingerprint(model: str) -> str:
    """system_fingerprint: the model and the server's version."""
    try:
        release = version("layerswarm")
    except PackageNotFoundError:
        release = "unknown"
    return "fp_" + hashlib.sha256(f"{model}|{release}".encode()).hexdigest()[:10]


class Shape:
    """The responses of one request (chat or text completion); with `reasoning` (a thinking
    model's chat), messages carry `reasoning_content`, null where there was no thought; with
    `token_ids` (return_token_ids, as vLLM's), choices carry `token_ids` (the ids generated, or a
    chunk's) and the prompt's ids come as `prompt_token_ids` (a chat's on the response, a
    completion's on each choice; streamed, on the first chunk)."""

    def __init__(
        self,
        rid: str,
        model: str,
        chat: bool,
        tokenizer,
        logprobs: int | None,
        tools: list,
        reasoning: bool = False,
        token_ids: bool = False,
        prompt_logprobs: int | None = None,
        echo: bool = False,
        tokens_as_ids: bool = False,
    ):
        self.rid, self.model, self.chat, self.tokenizer = rid, model, chat, tokenizer
        self.logprobs, self.tools, self.reasoning = logprobs, tools, reasoning
        self.token_ids = token_ids
        # vLLM's prompt_logprobs (this many likeliest tokens each); completions' echo (with
        # logprobs, the prompt's tokens come first in them)
        self.prompt_logprobs, self.echo = prompt_logprobs, echo
        self.tokens_as_ids = tokens_as_ids  # (vLLM's return_tokens_as_token_ids: "token_id:ID")
        self.created = int(time.time())
        self.fingerprint = fingerprint(model)

    def _base(self, obj: str) -> dict:
        return {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    # --- whole answers
    def whole(self, choices: list[Choice], usage: dict) -> dict:
        out = []
        for i, c in enumerate(choices):
            text = "".join(c.text)
            if self.chat:  # (with vLLM's echo: the last message's text first)
                message, finish = self._message(c.echo + text, "".join(c.reasoning)), c.finish
                if "tool_calls" in message:
                    finish = "tool_calls" if finish != "length" else finish  # cut off: it says so
                lp = {"content": self._chat_logprobs(c.tokens)} if self.logprobs is not None else None
                out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
            else:
                lp = self._text_logprobs(c.tokens, len(c.echo)) if self.logprobs is not None else None
                if lp is not None and self.echo:
                    lp = {k: v + lp[k] for k, v in self.echo_logprobs(c.prompt_ids, c.scores).items()}
                out.append({"index": i, "text": c.echo + text, "logprobs": lp, "finish_reason": c.finish})
                # (null where not asked, as vLLM's)
                out[-1]["prompt_logprobs"] = (
                    None if self.prompt_logprobs is None else self._prompt_logprobs(c)
                )
            if self.token_ids:
                if not self.chat:
                    out[-1]["prompt_token_ids"] = c.prompt
                out[-1]["token_ids"] = c.ids
        obj = "chat.completion" if self.chat else "text_completion"
        body = {**self._base(obj), "choices": out, "usage": usage}
        if self.token_ids and self.chat:
            body["prompt_token_ids"] = choices[0].prompt if choices else []
        if self.chat:  # (vLLM: of the one prompt, beside the choices; null where not asked)
            asked = self.prompt_logprobs is not None and choices
            body["prompt_logprobs"] = self._prompt_logprobs(choices[0]) if asked else None
        return body

    def _message(self, text: str, reasoning: str) -> dict:
        """A whole answer's message: its content, thought and tool calls."""
        message: dict = {"role": "assistant", "content": text}
        if self.reasoning:
            message["content"] = (text or None) if reasoning else text
            message["reasoning_content"] = reasoning or None
        if self.tools:
            content, calls = split_calls(text, self.tools)
            if calls or content != text:  # (calls, or a call cut off: its markup is no content)
                message["content"] = content
            if calls:
                message["tool_calls"] = openai_calls(calls)
        return message

    # --- streamed chunks
    def chunk(
        self,
        index: int,
        delta: dict | str,
        finish: str | None = None,
        logprobs=None,
        ids: Sequence[int] = (),
        prompt: list[int] | None = None,
    ) -> dict:
        """One streamed chunk of choice `index`; with token_ids, the `ids` it covers (and
        `prompt`, the prompt's ids, where it is the first chunk to carry them)."""
        if self.chat:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            chunk = {**self._base("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
            chunk = {**self._base("text_completion"), "choices": [choice]}
        if self.token_ids:
            choice["token_ids"] = list(ids)
            if prompt is not None:
                (chunk if self.chat else choice)["prompt_token_ids"] = prompt
        return chunk

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage}

    def delta_logprobs(self, tokens: Sequence[Token], offset: int) -> dict | None:
        if self.logprobs is None:
            return None
        if self.chat:
            return {"content": self._chat_logprobs(tokens)}
        return self._text_logprobs(tokens, offset)

    # --- logprobs
    def _name(self, token: int) -> str:
        """How logprobs name a token: its text, or "token_id:ID" (return_tokens_as_token_ids)."""
        return f"token_id:{token}" if self.tokens_as_ids else self.tokenizer.token_text(token)

    def echo_logprobs(self, prompt_ids: Sequence[int], scores: Sequence[PositionScore]) -> dict:
        """An echoed prompt's tokens in completions' logprobs (the first has none: nothing
        comes before it)."""
        if not prompt_ids:  # (never scored: nothing to give)
            return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        texts = [self.tokenizer.token_text(t) for t in prompt_ids]
        offsets, offset = [], 0
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        top: list[dict | None] = [None]
        for token, s in zip(prompt_ids[1:], scores, strict=True):  # (the token itself first, as vLLM's)
            top.append(
                {self._name(token): s.logprob} | {self._name(a): lp for a, lp in s.top[: self.logprobs]}
            )
        return {
            "tokens": [self._name(t) for t in prompt_ids],
            "token_logprobs": [None, *(s.logprob for s in scores)],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def _prompt_logprobs(self, c: Choice) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt token (none for the first) its own logprob and the
        likeliest tokens', by token id, each with its rank and text."""
        out: list[dict | None] = [None]
        for token, s in zip(c.prompt_ids[1:], c.scores, strict=True):
            entry = {
                str(a): {"logprob": lp, "rank": r, "decoded_token": self._name(a)}
                for r, (a, lp) in enumerate(s.top[: self.prompt_logprobs], start=1)
            }
            entry.setdefault(
                str(token),
                {"logprob": s.logprob, "rank": s.rank, "decoded_token": self._name(token)},
            )
            out.append(entry)
        return out

    def _chat_logprobs(self, tokens: Sequence[Token]) -> list[dict]:
        return chat_logprobs(self.tokenizer, tokens, self.logprobs or 0, self._name)

    def _text_logprobs(self, tokens: Sequence[Token], offset: int) -> dict:
        texts = [self.tokenizer.token_text(t.token) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)

        def top_of(t: Token) -> dict:  # (the chosen one first, as vLLM's, and the `logprobs` likeliest)
            return {self._name(t.token): t.logprob} | {self._name(a): lp for a, lp in t.top[: self.logprobs]}

        top = [top_of(t) for t in tokens]
        return {
            "tokens": [self._name(t.token) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": top,
            "text_offset": offsets,
        }


def chat_logprobs(tokenizer, tokens: Sequence[Token], top: int, name=None) -> list[dict]:
    """Each token's logprob as the chat path gives them (and the Responses API's output_text):
    {token, logprob, bytes, top_logprobs: the `top` likeliest, each {token, logprob, bytes}};
    `name(token)` names a token (its text by default)."""
    name = name or tokenizer.token_text

    def entry(token: int, logprob: float) -> dict:
        text = name(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [
        {**entry(t.token, t.logprob), "top_logprobs": [entry(a, lp) for a, lp in t.top[:top]]} for t in tokens
    ]
