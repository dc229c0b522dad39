"""The events a request's generations send to its response: a step done, a piece of text (with
the tokens it covers), a sequence finished. Runs make them, merging renumbers them, the whole
answer and the stream of chunks read them."""

from dataclasses import dataclass

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


Event = Stepped | Delta | Finish


def renumbered(event: Event, offset: int) -> Event:
    """The event with its sequence counted `offset` further (a run's sequence i becomes choice
    offset + i when several runs merge)."""
    if isinstance(event, Delta):
        return Delta(event.index + offset, event.text, event.tokens, event.reasoning)
    if isinstance(event, Finish):
        return Finish(event.index + offset, event.reason, event.tokens)
    return event
