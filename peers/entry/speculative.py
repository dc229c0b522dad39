"""Speculative decoding at the entry: draft the next tokens (prompt lookup, or a small draft model),
send them through the chain as one step, keep the drafts up to the first the last peer sampled
otherwise plus that sample; the peers drop the rest (inference/kv_cache.py: `rewind`)."""

import asyncio
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger("layerswarm.entry")

K_START = 4  # drafted tokens per step at first
K_MAX = 8  # and at most (the protocol allows up to MAX_DRAFT)
MIN_NGRAM, MAX_NGRAM = 3, 5  # n-gram lengths looked up, longest first (shorter ones match by chance)
PAUSE_AFTER_MISSES = 2  # steps in a row with no draft kept before drafting pauses
FIRST_PAUSE_STEPS = 4  # the first pause
MAX_PAUSE_STEPS = 32  # the longest pause (it doubles on each repeat)


class Drafter:
    """Drafts for one sequence by prompt lookup, and adapts how many to the acceptance it sees:
    more while all are kept, as many as were kept plus one otherwise, none for a while (a
    pause that doubles) when several steps in a row kept nothing, so that novel text costs
    almost nothing extra.

    While the text copies a passage (a draft was at least partly kept), the next draft goes on
    from where the copy stands in that passage, one token past the first that was not kept: an
    edit (a renamed variable, a changed word) then costs one step, not the n-gram lookup's
    several until the edited token leaves its window."""

    def __init__(self, context: list[int], k_max: int = K_MAX):
        self.tokens: list[int] = []
        self.k_max = k_max
        self.k = min(K_START, k_max)
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest occurrence ends
        self._misses = 0
        self._pause = 0  # plain steps left before drafting again
        self._next_pause = FIRST_PAUSE_STEPS
        self._copying: int | None = None  # where in `tokens` the passage being copied goes on
        self._drafted_from: int | None = None  # where the last draft was taken from
        self.extend(context)

    def extend(self, tokens: list[int]) -> None:
        """Tokens appended to the sequence (accepted, or sampled)."""
        for t in tokens:
            end = len(self.tokens)
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):  # the n-grams that now have a continuation
                if end >= n:
                    self._index[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(t)

    def propose(self, limit: int) -> list[int]:
        """Up to min(k, limit) drafted tokens to follow the sequence; [] for a plain step."""
        if self._pause:
            self._pause -= 1
            return []
        return self.lookup(limit)

    def lookup(self, limit: int) -> list[int]:
        """The prompt-lookup draft (see the class), or []."""
        self._drafted_from = None
        if limit < 1:
            return []
        end = self._copying if self._copying is not None and self._copying < len(self.tokens) else None
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if end is not None:
                break
            if len(self.tokens) >= n:
                end = self._index.get(tuple(self.tokens[-n:]))
        if end is None:
            return []
        self._drafted_from = end
        out: list[int] = []
        for i in range(min(self.k, limit)):  # (overlapping, as in LZ77: a repeat repeats on)
            at = end + i
            out.append(self.tokens[at] if at < len(self.tokens) else out[at - len(self.tokens)])
        return out

    def record(self, drafted: int, accepted: int) -> None:
        """A drafted step came back: `accepted` of its `drafted` tokens were kept."""
        if self._drafted_from is not None:  # the copy goes on past the token the model chose itself
            self._copying = self._drafted_from + accepted + 1 if accepted else None
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 2)
        else:
            self.k = max(1, accepted + 1)
        if accepted:
            self._misses, self._next_pause = 0, FIRST_PAUSE_STEPS
            return
        self._misses += 1
        if self._misses >= PAUSE_AFTER_MISSES:
            self._pause, self._misses = self._next_pause, 0
            self._next_pause = min(MAX_PAUSE_STEPS, 2 * self._next_pause)


class ModelDrafter(Drafter):
    """Prompt lookup first; where it finds nothing, the next tokens of a small draft model the
    entry runs itself (`--draft-model`), greedy, with its own KV cache of this sequence (a
    session of the draft block, rolled back to what the sequence still shares with it).
    `draft_with_model` runs on the entry's compute thread."""

    def __init__(self, context: list[int], block, k_max: int = K_MAX):
        super().__init__(context, k_max)
        self.block = block
        self.session = f"draft-{uuid.uuid4().hex}"
        self._held: list[int] = []  # the tokens whose keys and values the draft session holds
        self._lock = threading.Lock()
        self._use_model = True

    def propose(self, limit: int) -> list[int] | None:
        """As Drafter's, but None where prompt lookup finds nothing: ask `draft_with_model`."""
        if self._pause:
            self._pause -= 1
            return []
        return self.lookup(limit) or (None if limit >= 1 and self._use_model else [])

    @torch.inference_mode()
    def draft_with_model(self, limit: int) -> list[int]:
        with self._lock:
            context = self.block.config.max_position_embeddings
            k = min(self.k, limit, context - len(self.tokens))
            if k < 1 or not self.tokens:
                return []
            common = 0
            for a, b in zip(self._held, self.tokens, strict=False):
                if a != b:
                    break
                common += 1
            common = min(common, len(self.tokens) - 1)  # the last token is fed, to get its logits
            feed = self.tokens[common:]
            out: list[int] = []
            held = self.tokens[:common]
            for _ in range(k):
                logits = self.block.forward(self.session, torch.tensor([feed]), len(held), rewind=True)
                held = held + feed
                token = int(logits[0, -1].argmax())
                out.append(token)
                feed = [token]
            self._held = held
            self._drafted_from = None
            return out

    def drop_model(self) -> None:
        """The draft model failed this request (e.g. its cache is full): prompt lookup only."""
        self.close()
        self._use_model = False

    def close(self) -> None:
        with self._lock:
            self.block.close(self.session)
            self._held = []


def accepted_length(draft: list[int], sampled: list[int]) -> int:
    """How many drafted tokens are kept: those equal to what was sampled after the position
    before each (sampled[i] follows the i-th position of the step; draft[i] is its position i + 1).

    Why the output is exact: the last peer samples after each position from that position's own
    generator (inference/sampling.py), as plain decoding would there. A draft is a point mass on
    one token d; keeping d when the sample equals it happens with probability p(d), and otherwise
    the sample is a token drawn from p without d: the rejection rule of speculative sampling for
    that draft, so the output has the model's distribution, greedy decoding gives the same
    tokens, and a seeded request gives the same tokens with or without speculation."""
    assert len(sampled) == len(draft) + 1, f"{len(sampled)} samples for {len(draft)} drafted tokens"
    j = 0
    while j < len(draft) and draft[j] == sampled[j]:
        j += 1
    return j


@dataclass
class SpeculationStats:
    steps: int = 0  # drafted steps
    drafted: int = 0  # drafted tokens sent
    accepted: int = 0  # drafted tokens kept

    def record(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted

    def to_json(self) -> dict:
        rate = self.accepted / self.drafted if self.drafted else 0.0
        return {
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": round(rate, 3),
        }


class Compute(Protocol):
    """Runs a function on the peer's compute thread (the scheduler's)."""

    def run_in_compute(self, fn: Callable, *args) -> Awaitable[Any]: ...


class Speculation:
    """One request's drafting at its entry: each decode step's draft (prompt lookup, else the
    draft model on the compute thread), and what the chain kept of it. An optional speed-up: a
    failing draft model never fails the request."""

    def __init__(
        self,
        context: list[int],
        draft_block,
        compute: Compute,
        stats: SpeculationStats,
        spawn: Callable[[Coroutine], asyncio.Task],
    ):
        self.drafter = Drafter(context) if draft_block is None else ModelDrafter(context, draft_block)
        self.compute, self.stats, self.spawn = compute, stats, spawn

    async def propose(self, room: int) -> list[int]:
        """Up to `room` drafted tokens to follow the sequence ([] for a plain step)."""
        draft = self.drafter.propose(room)
        if draft is not None:
            return draft
        try:  # nothing to look up: the entry's draft model drafts
            return await self.compute.run_in_compute(self.drafter.draft_with_model, room)
        except Exception as e:
            log.warning("the draft model failed (%s: %s); prompt lookup only", type(e).__name__, e)
            await self.compute.run_in_compute(self.drafter.drop_model)
            return []

    def accepted(self, draft: list[int], sampled: list[int]) -> int:
        """How many of `draft` the chain kept (`sampled`: its draft + 1 tokens); recorded."""
        kept = accepted_length(draft, sampled)
        self.drafter.record(len(draft), kept)
        self.stats.record(len(draft), kept)
        return kept

    def extend(self, tokens: list[int]) -> None:
        self.drafter.extend(tokens)

    def close(self) -> None:
        if isinstance(self.drafter, ModelDrafter):  # (on the compute thread: a draft may be running there)
            self.spawn(self.compute.run_in_compute(self.drafter.close))
