"""What kind of claim a failure of the next hop is (HopFailed.claim): a next hop that did not
answer is UNREACHABLE (a liveness check of it decides), one that answered garbage, too much or an
error is WRONG_ANSWER (it is alive: a liveness check of it would wrongly blame the reporter)."""

import asyncio

import httpx
import pytest

from peers.transport.errors import UNREACHABLE, WRONG_ANSWER, HopFailed
from peers.transport.forwarder import Forwarder
from peers.transport.limits import MAX_REPLY_BYTES
from tests.peers.transport.wire_samples import HOPS, hidden, step


def pushed(handler) -> HopFailed:
    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            fwd = Forwarder("me", http, 5.0, 0.01)
            (outcome,) = await asyncio.gather(fwd.push(step(hidden((1, 2, 64)))), return_exceptions=True)
            return outcome

    outcome = asyncio.run(main())
    assert isinstance(outcome, HopFailed) and outcome.peer_id == HOPS[0].peer_id, outcome
    return outcome


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("All connection attempts failed", request=request)


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (refused, UNREACHABLE),
        (lambda r: httpx.Response(200, json={"results": "garbage"}), WRONG_ANSWER),
        (lambda r: httpx.Response(200, json={"results": [{"tokens": "garbage"}]}), WRONG_ANSWER),
        (lambda r: httpx.Response(200, content=b"not json"), WRONG_ANSWER),
        (lambda r: httpx.Response(502, content=b"<html>bad gateway</html>"), WRONG_ANSWER),
        (lambda r: httpx.Response(200, content=b" " * (MAX_REPLY_BYTES + 1)), WRONG_ANSWER),
    ],
    ids=["refused", "misfit", "no-tokens", "not-json", "error-not-json", "too-large"],
)
def test_a_next_hop_that_answered_is_never_claimed_unreachable(answer, kind):
    assert pushed(answer).claim == kind
