"""The forwarder in one process, over httpx's MockTransport: which steps travel together, and
whom a failure of the next hop blames."""

import asyncio
from dataclasses import replace

import httpx
import pytest

from peers.transport.errors import HopFailed
from peers.transport.forwarder import Forwarder
from peers.transport.frames import decode_steps
from peers.transport.results import failure_body
from tests.peers.transport.wire_samples import HOPS, hidden, step


def run(answer, pushes):
    """Push the steps `pushes(fwd)` names through a forwarder whose next hop answers `answer`;
    the outcomes (results or HopFailed) and the messages the next hop received."""
    messages = []

    def handler(request: httpx.Request) -> httpx.Response:
        frames = decode_steps(request.content)
        messages.append(frames)
        return answer(frames)

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            fwd = Forwarder("me", http, 5.0, 0.01)
            return await asyncio.gather(*pushes(fwd), return_exceptions=True)

    return asyncio.run(main()), messages


def ok(frames) -> httpx.Response:
    return httpx.Response(200, json={"results": [{"tokens": [1], "logprobs": [-0.5]}] * len(frames)})


def test_steps_ready_together_travel_as_one_message_and_a_long_prompt_alone():
    short = [replace(step(hidden((1, 2, 64), seed=i)), session_id=f"s{i}" * 8) for i in range(3)]
    long = step(hidden((1, 300, 64)))
    outcomes, messages = run(ok, lambda fwd: [fwd.push(s) for s in (*short, long)])
    assert [o.tokens for o in outcomes] == [[1]] * 4
    assert sorted(len(m) for m in messages) == [1, 3]


def test_a_next_hop_that_refuses_the_input_blames_the_sender():
    def refuse(frames):
        return httpx.Response(502, json=failure_body(HopFailed(HOPS[0].peer_id, "not finite", "bad_input")))

    (outcome,), _ = run(refuse, lambda fwd: [fwd.push(step(hidden((1, 2, 64))))])
    assert isinstance(outcome, HopFailed) and outcome.peer_id == "me" and outcome.reason == "failed"
    assert outcome.detail == f"its output was refused by {HOPS[0].peer_id}: not finite"


@pytest.mark.parametrize(
    "answer, says",
    [
        (lambda frames: httpx.Response(200, json={"results": []}), "does not fit its message"),
        (lambda frames: httpx.Response(500, text="oops"), "not JSON"),
    ],
)
def test_a_next_hop_that_answers_badly_is_at_fault(answer, says):
    (outcome,), _ = run(answer, lambda fwd: [fwd.push(step(hidden((1, 2, 64))))])
    assert isinstance(outcome, HopFailed) and outcome.peer_id == HOPS[0].peer_id and says in outcome.detail


def test_a_next_hop_that_does_not_answer_in_time_is_at_fault():
    def hang(frames):
        raise httpx.ReadTimeout("no answer")

    (outcome,), _ = run(hang, lambda fwd: [fwd.push(step(hidden((1, 2, 64))))])
    assert isinstance(outcome, HopFailed) and outcome.peer_id == HOPS[0].peer_id
    assert outcome.detail.startswith("no answer within")
