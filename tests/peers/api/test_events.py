"""Runs as typed events, without a swarm: a fake generation's tokens become deltas and finishes,
several runs merge with their choices renumbered, and a whole answer collects them."""

import asyncio

import pytest

import peers.api.runs
from peers.api.events import Delta, Finish, Stepped, renumbered
from peers.api.runs import Run, RunSpec, collect, first_events, merged, usage
from peers.entry.generation import Token
from peers.transport.frames import Sampling
from tests.peers.api.fakes import node


def spec(n: int = 1, **kw) -> RunSpec:
    fields = {"prompt_ids": [65, 66], "max_tokens": 8, "sampling": Sampling(), "stops": [], "stop_ids": {0}}
    return RunSpec(**{**fields, "stop_ids": frozenset(fields["stop_ids"]), "n": n, **kw})


def fake_generation(steps: list[list[int]]):
    async def generate(node, prompt_ids, max_tokens, sampling, stop_ids, n, **kw):
        for step in steps:
            yield [Token(t, -0.5) for t in step]

    return generate


async def events_of(run: Run) -> list:
    return [e async for e in run.events()]


def test_a_run_turns_tokens_into_deltas_and_finishes(monkeypatch):
    monkeypatch.setattr(peers.api.runs, "generate", fake_generation([[ord("h"), ord("i")], [ord("!"), 0]]))
    run = Run(node(), spec(n=2))
    events = asyncio.run(events_of(run))
    assert events == [
        Delta(0, "h", (Token(ord("h"), -0.5),)),
        Delta(1, "i", (Token(ord("i"), -0.5),)),
        Stepped(),
        Delta(0, "!", (Token(ord("!"), -0.5),)),
        Finish(1, "stop", (0,)),  # (the stop id: in no text, one of the tokens generated)
        Stepped(),
        Finish(0, "length"),
    ]
    assert run.completion_tokens == 4 and run.finish == ["length", "stop"]
    expected = {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert usage([run]) == {**expected, "prompt_tokens_details": {"cached_tokens": 0}}


def test_a_stop_string_ends_the_sequence_and_is_not_sent(monkeypatch):
    monkeypatch.setattr(peers.api.runs, "generate", fake_generation([[ord(c)] for c in "ab.cd"]))
    events = asyncio.run(events_of(Run(node(), spec(stops=[".c"]))))
    text = "".join(e.text for e in events if isinstance(e, Delta))
    # (".c", generated and cut off the text, are the finish's tokens)
    assert text == "ab" and events[-2:] == [Finish(0, "stop", (ord("."), ord("c"))), Stepped()]
    assert sum(isinstance(e, Stepped) for e in events) == 4  # it ends at the step that completed ".c"


def test_renumbered_moves_a_runs_sequences_and_leaves_steps():
    assert renumbered(Delta(1, "x", ()), 4) == Delta(5, "x", ())
    assert renumbered(Finish(0, "stop", (7,)), 2) == Finish(2, "stop", (7,))
    assert renumbered(Stepped(), 3) == Stepped()
    with pytest.raises(AttributeError):
        Delta(0, "x", ()).text = "y"  # frozen: an event is what was sent


async def stream(*events):
    for e in events:
        yield e


def test_merged_runs_become_one_stream_of_choices():
    a = stream(Delta(0, "a", ()), Stepped(), Finish(1, "length"))
    b = stream(Delta(1, "b", ()), Finish(0, "stop"))

    async def take():
        return [e async for e in merged([a, b], width=2)]

    got = asyncio.run(take())
    assert sorted((type(e).__name__, getattr(e, "index", -1)) for e in got) == [
        ("Delta", 0),
        ("Delta", 3),
        ("Finish", 1),
        ("Finish", 2),
        ("Stepped", -1),
    ]


def test_collect_and_first_events():
    async def run():
        events = stream(Delta(0, "a", (Token(1, -1.0),)), Stepped(), Delta(0, "b", ()), Finish(0, "stop"))
        first = await first_events(events)
        rest = await collect(events, 1)
        return first, rest

    first, (choice,) = asyncio.run(run())
    assert first == [Delta(0, "a", (Token(1, -1.0),)), Stepped()]
    assert choice.text == ["b"] and choice.finish == "stop" and choice.tokens == []
