"""This peer's hop of a step (peers/hop.py) in one process: the refusals made before any work,
the same for nested calls and direct return; both paths give the same tokens; a checked step
carries the same commitments either way."""

import asyncio
from dataclasses import replace

import pytest
import torch

from peers.transport.errors import HopFailed
from peers.transport.frames import Hop, ReplyTo, Sampling, StepRequest
from tests.helpers import greedy_reference, monolithic
from tests.peers.test_inprocess import PROMPTS, start_swarm, stop_swarm

GREEDY = Sampling(temperature=0)


def route(nodes) -> list[Hop]:
    return [Hop(n.peer_id, n.config.address, n.table.me.start, n.table.me.end) for n in nodes]


def step(hops, session="s", tensor=None, **fields) -> StepRequest:
    tensor = torch.tensor([PROMPTS[0]]) if tensor is None else tensor
    return StepRequest(session, 0, hops, GREEDY, tensor, **fields)


async def direct(entry, req: StepRequest, step_id: str):
    """`req` returned directly to `entry`: its result (or HopFailed) once the last hop sends it."""
    req = replace(req, reply_to=ReplyTo(entry.peer_id, entry.config.address), step_id=step_id)
    pending = entry.returns.expect(step_id, req.hops)
    await entry.hops.accept_step(req)
    return await asyncio.wait_for(pending.future, 30)


def refusals(nodes) -> dict[str, StepRequest]:
    """Frames the first peer (layers 0:2 of a two-peer swarm) refuses, by what is wrong."""
    first, last = nodes
    hops = route(nodes)
    stranger = Hop("a-peer-nobody-knows", "127.0.0.1:1", 2, 4)
    return {
        "cannot run hop": step([Hop(last.peer_id, first.config.address, 0, 2), hops[1]]),
        "not inside its span": step([replace(hops[0], end=3), replace(hops[1], start=3)]),
        "ends at layer 2": step(hops[:1]),
        "visits a peer more than once": step([hops[0], replace(hops[0], start=2, end=4)]),
        "at most 64 sequences": step(hops, tensor=torch.zeros(65, 3, dtype=torch.long)),
        "pass the model's context": step(hops, tensor=torch.zeros(1, 10**6, dtype=torch.long)),
        "a session id is 1 to 128": step(hops, session="x" * 129),
        "is not a serving peer of its table": step([hops[0], stranger]),
    }


REASONS = {
    "cannot run hop": "busy",
    "not inside its span": "failed",
    "is not a serving peer of its table": "busy",
}


def test_the_checks_before_any_work_refuse_alike_nested_and_direct(tiny_llama):
    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:2", "2:4"])
        first = nodes[0]
        for node in nodes:
            node._gossip_task.cancel()  # (a stranger stays unknown: no round learns it)
        try:
            seen = {}
            for what, req in refusals(nodes).items():
                with pytest.raises(HopFailed) as nested:
                    await first.hops.run_step(req)
                with pytest.raises(HopFailed) as returned:
                    await first.hops.accept_step(
                        replace(req, reply_to=ReplyTo(first.peer_id, first.config.address), step_id="x")
                    )
                seen[what] = (nested.value, returned.value)
            return seen, first.steps_served
        finally:
            await stop_swarm(nodes)

    seen, served = asyncio.run(main())
    for what, (nested, returned) in seen.items():
        assert what in nested.message, (what, nested.message)
        assert (nested.message, nested.reason, nested.peer_id) == (
            returned.message,
            returned.reason,
            returned.peer_id,
        )
        assert nested.reason == REASONS.get(what, "bad_request"), (what, nested.reason)
    assert served == 0  # no refused step was computed


def test_hidden_states_that_are_not_finite_are_the_senders_fault(tiny_llama):
    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:2", "2:4"])
        last = nodes[1]
        hidden = torch.full((1, 3, last.model_config.hidden_size), float("nan"))
        try:
            with pytest.raises(HopFailed) as e:
                await last.hops.run_step(step(route(nodes)[1:], tensor=hidden))
            return e.value
        finally:
            await stop_swarm(nodes)

    e = asyncio.run(main())
    assert e.reason == "bad_input" and "not finite" in e.message


def test_a_step_returned_directly_to_an_unknown_entry_is_refused(tiny_llama):
    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:4"])
        node = nodes[0]
        node._gossip_task.cancel()
        req = step(route(nodes), reply_to=ReplyTo("nobody", "127.0.0.1:1"), step_id="x")
        try:
            with pytest.raises(HopFailed) as e:
                await node.hops.accept_step(req)
            return e.value
        finally:
            await stop_swarm(nodes)

    e = asyncio.run(main())
    assert e.reason == "busy" and "is not a live peer of its table" in e.message


def test_nested_and_direct_return_give_the_same_tokens(tiny_llama):
    """A prompt's step through two peers, and a decode step after it: the same tokens and
    logprobs whether the result comes back through the route or straight from the last peer."""
    model = monolithic(tiny_llama)
    expected = greedy_reference(model, PROMPTS[0], 2)

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:2", "2:4"])
        entry, hops = nodes[0], route(nodes)
        try:
            got = {}
            for how in ("nested", "direct"):
                prompt = step(hops, session=how)
                first = (
                    await entry.hops.run_step(prompt) if how == "nested" else await direct(entry, prompt, "p")
                )
                decode = replace(prompt, position=len(PROMPTS[0]), tensor=torch.tensor([first.tokens]))
                second = (
                    await entry.hops.run_step(decode) if how == "nested" else await direct(entry, decode, "d")
                )
                got[how] = (first, second)
            return got, [n.steps_served for n in nodes]
        finally:
            await stop_swarm(nodes)

    got, served = asyncio.run(main())
    (n1, n2), (d1, d2) = got["nested"], got["direct"]
    assert n1.tokens + n2.tokens == d1.tokens + d2.tokens == expected
    assert n1.logprobs + n2.logprobs == pytest.approx(d1.logprobs + d2.logprobs, abs=1e-5)
    assert served == [4, 4]


def test_a_checked_step_commits_alike_nested_and_direct(tiny_llama):
    """A checked step: every hop signs a commitment to what it was sent and what it computed,
    and along a nested route each hop's output is the next one's input (the first hop checks
    its next hop's); a last hop commits alike whichever way its result travels (a checked frame
    returned directly can only be a one-hop route: the frame codec refuses it on the wire)."""

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:2", "2:4", "0:4"])
        whole = nodes[2]
        try:
            nested = await nodes[0].hops.run_step(step(route(nodes[:2]), session="two", verify="digest"))
            alone = await whole.hops.run_step(step(route(nodes[2:]), session="nested", verify="digest"))
            returned = await direct(whole, step(route(nodes[2:]), session="direct", verify="digest"), "c")
            return nested, alone, returned, whole.table
        finally:
            await stop_swarm(nodes)

    nested, alone, returned, table = asyncio.run(main())
    first, last = nested.commitments
    assert (first.start, first.end, last.start, last.end) == (0, 2, 2, 4)
    assert first.context == last.context == "digest" and first.output_digest == last.input_digest
    assert nested.top is None and alone.top is None and returned.top is None
    (mine,), (theirs,) = alone.commitments, returned.commitments
    assert (mine.start, mine.end, mine.context) == (0, 4, "digest")
    assert mine.input_digest == theirs.input_digest and (mine.indices, mine.values) == (
        theirs.indices,
        theirs.values,
    )
    assert alone.tokens == returned.tokens
