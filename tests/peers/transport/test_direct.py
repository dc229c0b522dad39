"""Direct return: the last peer sends each result straight to the entry and no hop waits for
the rest of the route; a peer that dies or drops a step after acknowledging it is found by
probing the late step (or, stalled, at its deadline) and failed over exactly; a frame cannot
pick where results go, and results for no step in flight, or from off the route, are ignored."""

import asyncio

import httpx
import pytest
import torch

from peers.transport.direct import DONE, QUEUED, UNKNOWN, Progress, Returns, probe_route
from peers.transport.errors import HopFailed
from peers.transport.frames import PATH_RESULTS, PATH_STEPS, Hop, ReplyTo, Sampling, StepRequest, encode_steps
from peers.transport.results import StepResult
from tests.helpers import greedy_reference, monolithic
from tests.peers.test_inprocess import PROMPTS, start_swarm, stop_swarm, tokens_of

ROUTE = [Hop("a", "10.0.0.1:1", 0, 2), Hop("b", "10.0.0.2:1", 2, 4)]


# -- the entry's bookkeeping -----------------------------------------------------------------------
def test_only_the_last_hop_of_the_route_returns_a_result():
    async def main():
        returns = Returns()
        pending = returns.expect("s1", ROUTE)
        taken = [
            returns.deliver("stranger", "s1", StepResult([1], [0.0])),  # not on the route
            returns.deliver("a", "s1", StepResult([1], [0.0])),  # on it, but not its last hop
            returns.deliver("b", "nope", StepResult([1], [0.0])),  # no such step in flight
            returns.deliver("b", "s1", StepResult([7], [-0.5])),
            returns.deliver("b", "s1", StepResult([8], [-0.5])),  # already answered
        ]
        return taken, pending.future.result(), returns.ignored

    taken, result, ignored = asyncio.run(main())
    assert taken == [False, False, False, True, False] and result.tokens == [7] and ignored == 4


def test_a_hop_can_only_blame_a_peer_of_the_route():
    async def main():
        returns = Returns()
        pending = returns.expect("s1", ROUTE)
        returns.deliver("a", "s1", HopFailed("innocent-bystander", "made up"))
        return pending.future.exception()

    error = asyncio.run(main())
    assert isinstance(error, HopFailed) and error.peer_id == "a"  # the accuser is the one blamed


def test_progress_is_bounded():
    progress = Progress(size=2)
    for sid in ("x", "y", "z"):
        progress.mark(sid, QUEUED)
    progress.mark("z", DONE)
    assert [progress.state(s) for s in ("x", "y", "z")] == [UNKNOWN, QUEUED, DONE]


@pytest.mark.parametrize(
    "states, blamed, sure, suspect",
    [
        ({"a": "done", "b": "queued"}, None, False, "b"),  # still on its way (b is blamed at the deadline)
        ({"a": "done", "b": httpx.ConnectError("refused")}, "b", True, "b"),  # nobody listens at b
        ({"a": "done", "b": httpx.ReadTimeout("slow")}, "b", False, "b"),  # b may be busy: look again
        (
            {"a": "done", "b": "unknown"},
            "b",
            False,
            "b",
        ),  # b acknowledged and lost it (sure on a second look)
        ({"a": "failed", "b": "unknown"}, "a", False, "a"),  # a failed and its report was lost
        ({"a": "done", "b": "done"}, "b", False, None),  # the result may still be on its way
        ({"a": "done", "b": ["not", "an", "object"]}, "b", False, "b"),  # a reply without a state
    ],
)
def test_a_probe_of_a_late_step_names_the_hop_at_fault(states, blamed, sure, suspect):
    def reply(request: httpx.Request) -> httpx.Response:
        peer = {"10.0.0.1": "a", "10.0.0.2": "b"}[request.url.host]
        state = states[peer]
        if isinstance(state, Exception):
            state.request = request
            raise state
        return httpx.Response(200, json=state if isinstance(state, list) else {"state": state})

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(reply)) as http:
            return await probe_route(http, "entry", Progress(), ROUTE, "s1")

    found, is_sure, blamed_at_deadline = asyncio.run(main())
    assert (found.peer_id if found else None, is_sure, blamed_at_deadline) == (blamed, sure, suspect)


# -- through a swarm ---------------------------------------------------------------------------
def test_results_come_straight_from_the_last_peer_while_no_hop_waits(tiny_llama):
    """The last peer computes only once the middle peer's send has been answered: with calls
    nested through the route this could never happen (the test would fail at its gate)."""
    model = monolithic(tiny_llama)
    expected = [greedy_reference(model, p, 8) for p in PROMPTS[:3]]

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:1", "1:3", "3:4"])
        entry, middle, last = nodes
        handed_on = asyncio.Event()
        push, compute = middle.forwarder.push, last.hops.compute

        async def middle_push(req):
            result = await push(req)
            handed_on.set()  # the middle peer's send to the last peer was answered
            return result

        async def last_compute(req, hop, block):
            await asyncio.wait_for(handed_on.wait(), 5)
            handed_on.clear()
            return await compute(req, hop, block)

        middle.forwarder.push, last.hops.compute = middle_push, last_compute
        try:
            got = []
            for p in PROMPTS[:3]:
                got.append(await tokens_of(entry, p, 8))
            return got, entry.returns.taken, entry.failovers
        finally:
            await stop_swarm(nodes)

    got, taken, failovers = asyncio.run(main())
    assert got == expected and failovers == 0
    assert taken == 3 * 8  # every step's result came to the entry from the last peer


@pytest.mark.parametrize("how", ["dies", "drops the step", "stalls"])
def test_a_hop_that_fails_silently_after_acknowledging_is_found_and_failed_over(tiny_llama, how):
    model = monolithic(tiny_llama)
    prompts = PROMPTS[:4]
    expected = [greedy_reference(model, p, 12) for p in prompts]

    async def main():
        # (a short hop deadline: a stalled hop is found at the step's deadline)
        settings = {0: {"hop_timeout_s": 1.0, "hop_timeout_per_token_s": 0.01}}
        net, nodes = await start_swarm(tiny_llama, ["0:4", "0:2", "0:2", "2:4"], settings=settings)
        entry, replicas = nodes[0], nodes[1:3]
        failing = []

        def on_token(count):
            if count == 5 and not failing:
                victim = max(replicas, key=lambda n: n.block.open_sessions())
                failing.append(victim)

                async def silently(req):  # takes the step (acknowledges it), then nothing comes of it
                    if how == "dies":
                        net.down.add(victim.config.address)  # gone: not even a probe is answered
                    return None

                async def forever(req, hop, block):  # its forward never ends (it answers probes: queued)
                    await asyncio.Event().wait()

                if how == "stalls":
                    victim.hops.compute = forever
                else:
                    victim.accept_step = silently

        try:
            entry.bans.ban(entry.peer_id, entry.table.me.incarnation)  # keep the entry off routes
            got = await asyncio.gather(*(tokens_of(entry, p, 12, on_token) for p in prompts))
            banned = entry.bans.banned({failing[0].peer_id: failing[0].table.me.incarnation})
            return got, entry.failovers, entry.returns.probes, banned, failing[0].peer_id
        finally:
            await stop_swarm(nodes)

    got, failovers, probes, banned, victim = asyncio.run(main())
    assert got == expected
    assert failovers >= 1 and probes >= 1  # found by probing the late step (or, stalled, at its deadline)
    assert victim in banned  # and the peer at fault is the one banned


def test_a_frame_cannot_make_a_peer_send_results_to_a_stranger(tiny_llama):
    """reply_to must be a live peer of the receiver's table: no frame turns a peer into a
    sender of traffic to an address of the frame's choosing."""

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:2", "2:4"])
        first, last = nodes
        dialled = []
        handle = net.handle_async_request

        async def watching(request):
            dialled.append(f"{request.url.host}:{request.url.port}")
            return await handle(request)

        net.handle_async_request = watching
        try:
            hops = [
                Hop(first.peer_id, first.config.address, 0, 2),
                Hop(last.peer_id, last.config.address, 2, 4),
            ]
            frame = StepRequest(
                "s",
                0,
                hops,
                Sampling(),
                torch.tensor([[1, 2, 3]]),
                reply_to=ReplyTo("x", "203.0.113.9:80"),
                step_id="1",
            )
            r = await first.http.post(
                f"http://{first.config.address}{PATH_STEPS}", content=encode_steps([frame])
            )
            forged = await first.http.post(
                f"http://{first.config.address}{PATH_RESULTS}",
                json={
                    "from": last.peer_id,
                    "results": [{"step_id": "nope", "tokens": [1], "logprobs": [0.0]}],
                },
            )
            bad = await first.http.post(f"http://{first.config.address}{PATH_RESULTS}", json={"results": 3})
            await asyncio.sleep(0.2)
            return r.json()["results"][0], forged.json(), bad.status_code, dialled
        finally:
            await stop_swarm(nodes)

    answer, forged, bad, dialled = asyncio.run(main())
    assert answer["error"]["type"] == "busy" and "not a live peer of its table" in answer["error"]["message"]
    assert "203.0.113.9:80" not in dialled
    assert forged == {"taken": 0} and bad == 400
