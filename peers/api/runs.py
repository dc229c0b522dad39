"""One request's generations: a run per prompt turns tokens into typed events (text deltas with
the tokens they cover, finish reasons) and counts usage; several runs merge into one stream of
choices."""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from peers.api.door import ApiPeer
from peers.api.events import Delta, Event, Finish, Scored, Stepped, renumbered
from peers.api.reasoning import ReasoningStart
from peers.api.shapes import Choice
from peers.api.textstream import TextStream
from peers.api.tools import repeats_a_call
from peers.entry.consensus import checked_generate, verified_generate
from peers.entry.generation import Token, generate
from peers.entry.routes import checked_by_a_second_route
from peers.entry.session import Prefill
from peers.entry.steering import Steering
from peers.transport.frames import Sampling


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
    cached = sum(r.prefill.cached_tokens for r in runs)  # (restored from the peers' prefix caches)
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def first_events(events: AsyncIterator[Event]) -> list[Event]:
    """The events up to and including the first step's end (the generator stays open for the
    rest)."""
    first: list[Event] = []
    while not first or not isinstance(first[-1], Stepped):
        try:
            first.append(await anext(events))
        except StopAsyncIteration:
            break
    return first


async def collect(events: AsyncIterator[Event], count: int) -> list[Choice]:
    """The `count` choices of a whole answer, from all their events."""
    choices = [Choice(i) for i in range(count)]
    async for event in events:
        if isinstance(event, Delta):
            choices[event.index].text.append(event.text)
            if event.reasoning:
                choices[event.index].reasoning.append(event.reasoning)
            choices[event.index].tokens += event.tokens
            choices[event.index].ids += [t.token for t in event.tokens]
        elif isinstance(event, Finish):
            choices[event.index].finish = event.reason
            choices[event.index].ids += event.tokens
        elif isinstance(event, Scored):
            choices[event.index].prompt_ids, choices[event.index].scores = event.prompt_ids, event.positions
    return choices


async def merged(streams: list[AsyncIterator[Event]], width: int) -> AsyncIterator[Event]:
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
            async for event in stream:
                await queue.put(renumbered(event, k * width))
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


@dataclass(frozen=True)
class RunSpec:
    """What one run generates: `n` sequences of one prompt, at most `max_tokens` each.

    `routes` > 1: that many whole routes, the majority deciding (the consensus field); `verify`:
    every replicated hop recomputed by a shadow (--verify-rate); `speculative`: drafted tokens
    checked by the chain where that applies (one sequence, unchecked); `tools`: a sequence ends
    once it repeats a tool call it made (a model looping on calls); `reasoning`: where a thinking
    model's output starts, its thought given apart from its text."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stops: list[str]  # stop strings
    stop_ids: frozenset[int]  # token ids that end a sequence
    n: int
    routes: int = 1
    verify: bool = False
    speculative: bool = False
    steering: Steering | None = None
    tools: bool = False
    reasoning: ReasoningStart | None = None
    keep: frozenset[int] = frozenset()  # special tokens kept in the text (the reasoning's markers)
    scores: int | None = None  # prompt logprobs, with this many likeliest tokens per position


class Run:
    """One generation of n sequences of one prompt: tokens -> text deltas (each with the tokens
    it covers), finish reasons and usage."""

    def __init__(self, node: ApiPeer, spec: RunSpec):
        self.node, self.spec = node, spec
        self.prompt_ids, self.stop_ids, self.n = spec.prompt_ids, spec.stop_ids, spec.n
        self.texts = [TextStream(node.tokenizer, spec.stops, spec.keep) for _ in range(spec.n)]
        self.thoughts = [spec.reasoning.parser() for _ in range(spec.n)] if spec.reasoning else None
        self.held: list[list[Token]] = [[] for _ in range(spec.n)]  # tokens whose text is not out yet
        self.finish = ["length"] * spec.n
        self.done = [False] * spec.n
        self.completion_tokens = 0
        self.clock = TokenClock(node.metrics, len(spec.prompt_ids))
        self.prefill = Prefill(spec.scores)
        self.scored = False

    def _generation(self) -> AsyncIterator[list[Token]]:
        spec = self.spec
        args = (self.node, spec.prompt_ids, spec.max_tokens, spec.sampling, spec.stop_ids, spec.n)
        if spec.verify and checked_by_a_second_route(self.node, spec.prompt_ids):
            return checked_generate(*args, routes=2, steering=spec.steering)  # a chain checks a long hop
        if spec.verify:
            return verified_generate(*args, steering=spec.steering)
        if spec.routes > 1:
            return checked_generate(*args, routes=spec.routes, steering=spec.steering)
        return generate(*args, speculative=spec.speculative, steering=spec.steering, prefill=self.prefill)

    async def events(self) -> AsyncIterator[Event]:
        """Per sequence its Delta and Finish events; a Stepped after each step."""
        gen = self._generation()
        try:
            async for tokens in gen:
                for event in self._scored():
                    yield event
                counted = self.completion_tokens
                for i, tok in enumerate(tokens):
                    if not self.done[i]:
                        for event in self._advance(i, tok):
                            yield event
                self.clock.step(self.completion_tokens - counted)
                yield Stepped()
                if all(self.done):
                    break
            for i in range(self.n):
                if not self.done[i]:
                    for event in self._end(i, "length"):
                        yield event
        finally:
            await gen.aclose()

    def _scored(self) -> Iterator[Scored]:
        """Each sequence's prompt scores, once they came (with the first step's tokens)."""
        if self.scored or self.prefill.positions is None:
            return
        self.scored = True
        for i in range(self.n):
            yield Scored(i, tuple(self.prompt_ids), self.prefill.positions)

    def _advance(self, i: int, tok: Token) -> Iterator[Event]:
        """Sequence i's new token: its text, and its end if it brings one."""
        self.completion_tokens += 1
        if tok.token in self.stop_ids:
            yield from self._end(i, "stop", tok.token)
            return
        self.held[i].append(tok)
        text = self.texts[i]
        delta = text.push(tok.token)
        if delta:
            yield from self._out(i, delta)
        if text.stopped or (self.spec.tools and delta and repeats_a_call(text.text)):
            yield from self._end(i, "stop")

    def _out(self, i: int, text: str, last: bool = False) -> Iterator[Delta]:
        """Sequence i's new text as a Delta, its thought apart where the model thinks (`last`:
        the text is complete)."""
        reasoning = ""
        if self.thoughts is not None:
            thought = self.thoughts[i]
            reasoning, text = thought.push(text)
            if last:
                more, rest = thought.finish()
                reasoning, text = reasoning + more, text + rest
        if text or reasoning:
            yield Delta(i, text, self._take(i), reasoning)

    def _take(self, i: int) -> tuple[Token, ...]:
        held, self.held[i] = self.held[i], []
        return tuple(held)

    def _end(self, i: int, reason: str, stop_id: int | None = None) -> Iterator[Event]:
        """Sequence i ends (`stop_id`: the stop token that ended it, in no text)."""
        self.done[i], self.finish[i] = True, reason
        yield from self._out(i, self.texts[i].finish(), last=True)
        rest = [t.token for t in self._take(i)] + ([stop_id] if stop_id is not None else [])
        yield Finish(i, reason, tuple(rest))
