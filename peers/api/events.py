"""The events a request's generations send to its response: a step done, a piece of text (with
the tokens it covers), a sequence finished. Runs make them, merging renumbers them, the whole
answer and the stream of chunks read them."""

from dataclasses import dataclass

from inference.sampling import PositionScore
from peers.entry.generation import Token


@dataclass(frozen=True)
class Stepped:
    """A generation step is done (every running sequence got its token)."""


@dataclass(frozen=True)
class Delta:
    """Sequence `index` has `text` to give out (and `reasoning`, a thinking model's thought,
    apart from it); `tokens` are the tokens it covers."""

    index: int
    text: str
    tokens: tuple[Token, ...]
    reasoning: str = ""


@dataclass(frozen=True)
class Finish:
    """Sequence `index` ended: "stop" (a stop id, stop string or repeated call) or "length";
    `tokens`: the ids it generated that no Delta covered (the stop id, tokens of no text)."""

    index: int
    reason: str
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Scored:
    """Sequence `index`'s prompt was scored: `positions[j]` scores prompt_ids[j + 1] (prompt
    logprobs; given before the sequence's first Delta)."""

    index: int
    prompt_ids: tuple[int, ...]
    positions: tuple[PositionScore, ...]


Event = Stepped | Delta | Finish | Scored


def renumbered(event: Event, offset: int) -> Event:
    """The event with its sequence counted `offset` further (a run's sequence i becomes choice
    offset + i when several runs merge)."""
    if isinstance(event, Delta):
        return Delta(event.index + offset, event.text, event.tokens, event.reasoning)
    if isinstance(event, Finish):
        return Finish(event.index + offset, event.reason, event.tokens)
    if isinstance(event, Scored):
        return Scored(event.index + offset, event.prompt_ids, event.positions)
    return event
