"""One request's generations: a run per prompt turns tokens into text deltas (each with the
tokens it covers), finish reasons and usage; several runs merge into one stream of choices."""

import asyncio
import time
from collections.abc import AsyncIterator

from peers.api.door import ApiPeer
from peers.api.shapes import Choice
from peers.api.textstream import TextStream
from peers.api.tools import repeats_a_call
from peers.entry.consensus import checked_generate, verified_generate
from peers.entry.generation import Token, generate
from peers.entry.steering import Steering


def best(choices: list[Choice], prompts: int, best_of: int, n: int) -> list[Choice]:
    """Of each prompt's best_of sequences, the n with the highest total logprob, in that order."""
    out = []
    for k in range(prompts):
        group = choices[k * best_of : (k + 1) * best_of]
        out += sorted(group, key=lambda c: -sum(t.logprob for t in c.tokens))[:n]
    return out


class TokenClock:
    """Times one generation into the peer's metrics (peers/metrics.py): its first step's tokens, then the gap between steps."""

    def __init__(self, metrics, prompt_tokens: int):
        self.metrics, self.started, self.last = metrics, time.perf_counter(), None
        metrics.prompt_tokens.inc(prompt_tokens)

    def step(self, tokens: int) -> None:
        """A step brought `tokens` new tokens (one per sequence still running)."""
        if tokens < 1:
            return
        now = time.perf_counter()
        self.metrics.generated_tokens.inc(tokens)
        self.metrics.tokens += tokens
        if self.last is None:
            self.metrics.ttft.observe(now - self.started)
        else:
            self.metrics.inter_token.observe(now - self.last)
        self.last = now


class Usage:
    """The runs of one request, as the request log line counts them."""

    def __init__(self, runs: list["Run"]):
        self.runs = runs

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.runs)


def usage(runs: list["Run"]) -> dict:
    p = sum(len(r.prompt_ids) for r in runs)
    c = sum(r.completion_tokens for r in runs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def first_events(events: AsyncIterator) -> list:
    """The events up to and including the first one that follows a generated token (the
    generator stays open for the rest)."""
    first = []
    while not first or first[-1][0] != "token":
        try:
            first.append(await anext(events))
        except StopAsyncIteration:
            break
    return first


async def collect(events: AsyncIterator, count: int) -> list[Choice]:
    choices = [Choice(i) for i in range(count)]
    async for kind, index, a, b in events:
        if kind == "delta":
            choices[index].text.append(a)
            choices[index].tokens += b
        elif kind == "finish":
            choices[index].finish = b
    return choices


async def merged(streams: list[AsyncIterator], width: int) -> AsyncIterator[tuple]:
    """The events of several runs as one stream; run k's sequence i becomes choice k * width + i."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield event
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream: AsyncIterator) -> None:
        try:
            async for kind, i, a, b in stream:
                await queue.put((kind, i if i < 0 else k * width + i, a, b))
            await queue.put(None)
        except Exception as e:
            await queue.put(e)
        finally:
            await stream.aclose()

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Run:
    """One generation of n sequences of one prompt: tokens -> text deltas (each with the tokens
    it covers), finish reasons and usage."""

    def __init__(
        self,
        node: ApiPeer,
        prompt_ids,
        max_tokens,
        sampling,
        stops,
        stop_ids,
        n: int,
        routes: int = 1,
        verify: bool = False,
        speculative: bool = False,
        steering: Steering | None = None,
        tools: bool = False,
    ):
        """`routes` > 1: that many whole routes, the majority deciding (the consensus field);
        `verify`: every replicated hop recomputed by a shadow (--verify-rate); `speculative`:
        drafted tokens checked by the chain where that applies (one sequence, unchecked);
        `tools`: a sequence ends once it repeats a tool call it made (a model looping on calls)."""
        self.node, self.prompt_ids, self.max_tokens = node, prompt_ids, max_tokens
        self.routes, self.verify, self.speculative = routes, verify, speculative
        self.sampling, self.stop_ids, self.n, self.steering = sampling, stop_ids, n, steering
        self.tools = tools
        self.texts = [TextStream(node.tokenizer, stops) for _ in range(n)]
        self.held: list[list[Token]] = [[] for _ in range(n)]  # tokens whose text is not out yet
        self.finish = ["length"] * n
        self.done = [False] * n
        self.completion_tokens = 0
        self.clock = TokenClock(node.metrics, len(prompt_ids))

    async def events(self) -> AsyncIterator[tuple]:
        """("token", -1, None, None) after each step; per sequence i ("delta", i, text, tokens)
        and ("finish", i, None, reason)."""
        args = (self.node, self.prompt_ids, self.max_tokens, self.sampling, self.stop_ids, self.n)
        if self.verify:
            gen = verified_generate(*args, steering=self.steering)
        elif self.routes > 1:
            gen = checked_generate(*args, routes=self.routes, steering=self.steering)
        else:
            gen = generate(*args, speculative=self.speculative, steering=self.steering)
        try:
            async for tokens in gen:
                counted = self.completion_tokens
                for i, tok in enumerate(tokens):
                    if self.done[i]:
                        continue
                    self.completion_tokens += 1
                    if tok.token in self.stop_ids:
                        for event in self._end(i, "stop"):
                            yield event
                        continue
                    self.held[i].append(tok)
                    delta = self.texts[i].push(tok.token)
                    if delta:
                        yield ("delta", i, delta, self._take(i))
                    if self.texts[i].stopped or (self.tools and delta and repeats_a_call(self.texts[i].text)):
                        for event in self._end(i, "stop"):
                            yield event
                self.clock.step(self.completion_tokens - counted)
                yield ("token", -1, None, None)
                if all(self.done):
                    break
            for i in range(self.n):
                if not self.done[i]:
                    for event in self._end(i, "length"):
                        yield event
        finally:
            await gen.aclose()

    def _take(self, i: int) -> list[Token]:
        held, self.held[i] = self.held[i], []
        return held

    def _end(self, i: int, reason: str):
        self.done[i], self.finish[i] = True, reason
        rest = self.texts[i].finish()
        if rest:
            yield ("delta", i, rest, self._take(i))
        yield ("finish", i, None, reason)
