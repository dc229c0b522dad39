"""Several peers in one process over httpx's in-memory transport: many concurrent generations
through one swarm equal each alone, and a peer that drops out mid-generation is failed over
exactly. No sockets, so scheduling and failover are tested without timing noise."""

import asyncio
from dataclasses import replace

import httpx
import pytest
import torch

from peers.config import NodeConfig
from peers.entry.generation import generate
from peers.node import PeerNode
from peers.server import create_app
from peers.swarm.membership import GossipSettings
from peers.transport.auth import SwarmAuth
from peers.transport.frames import Hop, Sampling
from tests.helpers import greedy_reference, monolithic

GOSSIP = GossipSettings(interval_s=0.05, suspect_after_s=5, dead_after_s=10, tombstone_s=30)
PROMPTS = [[5, 17, 99, 42, 7, 3, 250, 64, 12, 8, 77], [9, 9, 1, 200, 31], [44] * 3, list(range(3, 40))] * 2


class Loopback(httpx.AsyncBaseTransport):
    """Routes each request to the app of the peer it names; a peer in `down` refuses."""

    def __init__(self):
        self.apps: dict[str, httpx.ASGITransport] = {}
        self.down: set[str] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        address = f"{request.url.host}:{request.url.port}"
        if address in self.down or address not in self.apps:
            raise httpx.ConnectError(f"connection to {address} refused", request=request)
        return await self.apps[address].handle_async_request(request)


async def start_swarm(model, spans, swarm_key: bytes | None = None, settings: dict[int, dict] | None = None):
    """Peers of `spans` over one in-memory network (a private swarm with `swarm_key`); `settings`:
    NodeConfig fields of the i-th peer."""
    net = Loopback()
    nodes = []
    for i, layers in enumerate(spans):
        config = NodeConfig(
            model=str(model),
            layers=layers,
            port=9000 + i,
            join=("127.0.0.1:9000",) if i else (),
            threads=torch.get_num_threads(),
            gossip=GOSSIP,
            ban_s=60,
            swarm_key=swarm_key,
            **(settings or {}).get(i, {}),
        )
        auth = SwarmAuth(swarm_key) if swarm_key else None
        node = PeerNode(config, http=httpx.AsyncClient(transport=net, auth=auth))
        net.apps[config.address] = httpx.ASGITransport(app=create_app(node))
        nodes.append(node)
    await asyncio.gather(*(n.start() for n in nodes))
    for _ in range(200):  # until every table knows every peer
        if all(len(n.table.serving(n.model_id)) == len(nodes) for n in nodes):
            break
        await asyncio.sleep(0.05)
    return net, nodes


async def stop_swarm(nodes):
    await asyncio.gather(*(n.close() for n in nodes))


async def tokens_of(node, prompt, n, on_token=None):
    out = []
    async for step in generate(node, prompt, n, Sampling(temperature=0), frozenset()):
        out.append(step[0].token)
        if on_token:
            on_token(len(out))
    return out


def test_concurrent_generations_batch_and_equal_each_alone(tiny_llama):
    model = monolithic(tiny_llama)
    expected = [greedy_reference(model, p, 16) for p in PROMPTS]

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:1", "1:3", "3:4"])
        try:
            got = await asyncio.gather(*(tokens_of(nodes[0], p, 16) for p in PROMPTS))
            return (
                got,
                [n.scheduler.stats.max_batch_steps for n in nodes],
                [n.block.open_sessions() for n in nodes],
            )
        finally:
            await stop_swarm(nodes)

    got, batch_sizes, _ = asyncio.run(main())
    assert got == expected
    assert all(size > 1 for size in batch_sizes), batch_sizes  # every peer batched sessions


def test_a_next_hop_the_table_does_not_know_yet_is_learned_by_gossip(tiny_llama):
    """Tables lag a moment after a peer joins: a peer asked to forward to a hop it does not
    know runs a gossip round with the peers it knows, then forwards; it never dials the hop."""
    model = monolithic(tiny_llama)

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:1", "1:3", "3:4"])
        middle, last = nodes[1], nodes[2]
        try:
            for node in nodes:
                node._gossip_task.cancel()  # no gossip rounds from now on but those asked for
            del middle.table._peers[last.peer_id]  # as if it had not heard of the last peer yet
            assert not middle.hops.knows(Hop(last.peer_id, last.config.address, 3, 4))
            return await tokens_of(nodes[0], PROMPTS[0], 8), middle.table.status(last.peer_id)
        finally:
            await stop_swarm(nodes)

    got, status = asyncio.run(main())
    assert got == greedy_reference(model, PROMPTS[0], 8)
    assert status == "serving"


def test_a_peer_dropping_out_mid_generation_is_failed_over_exactly(tiny_llama):
    model = monolithic(tiny_llama)
    expected = [greedy_reference(model, p, 16) for p in PROMPTS]

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:4", "0:2", "0:2", "2:4"])  # entry, 2 replicas, tail
        entry, replicas = nodes[0], nodes[1:3]
        dropped = []

        def drop(count):
            if count == 6 and not dropped:  # the replica holding the sessions goes away
                victim = max(replicas, key=lambda n: n.block.open_sessions())
                assert victim.block.open_sessions() > 0
                net.down.add(victim.config.address)
                dropped.append(victim)

        try:
            # routes take the fewest hops: keep the entry off them by banning it on itself
            entry.bans.ban(entry.peer_id, entry.table.me.incarnation)
            got = await asyncio.gather(*(tokens_of(entry, p, 16, drop) for p in PROMPTS))
            return got, entry.failovers, dropped
        finally:
            await stop_swarm(nodes)

    got, failovers, dropped = asyncio.run(main())
    assert dropped, "no replica was dropped"
    assert failovers >= 1
    assert got == expected


def test_a_failed_move_goes_back_to_its_layers_or_stops_the_peer(tiny_llama, monkeypatch):
    monkeypatch.setattr("peers.swarm.placement.rebalance_target", lambda *args: (2, 4))

    async def main():
        _, nodes = await start_swarm(tiny_llama, ["0:4"])
        node = nodes[0]
        placement = node.placement
        placement.settings = replace(placement.settings, auto=True)  # as if it had placed itself
        placement.serving_since = -1e9
        real, fatal = node._load_block, []
        node.on_fatal = fatal.append

        def load(start, end):
            if (start, end) == (2, 4) or node.disk_gone:
                raise OSError("the weights cannot be read")
            return real(start, end)

        node._load_block, node.disk_gone = load, False
        try:
            await placement.rebalance()  # the move fails: back to 0:4, serving
            back = (node.table.me.start, node.table.me.end, node.table.me.state, node.ready)
            node.disk_gone, placement.serving_since = True, -1e9
            with pytest.raises(OSError):
                await placement.rebalance()  # the way back fails too: the peer stops
            return back, fatal
        finally:
            await stop_swarm(nodes)

    back, fatal = asyncio.run(main())
    assert back == (0, 4, "serving", True)
    assert len(fatal) == 1 and isinstance(fatal[0], OSError)


def test_one_frame_that_breaks_does_not_fail_its_whole_message(tiny_llama):
    """A coalesced /swarm/steps message: a frame whose step raises anything gets its own error
    result; the other frames of the message are answered normally."""
    from peers.transport.frames import PATH_STEPS, Hop, StepRequest, encode_steps

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:4"])
        node = nodes[0]
        real = node.run_step

        async def run_step(req):
            if req.session_id == "broken":
                raise RuntimeError("a bug in one step")
            return await real(req)

        node.run_step = run_step
        hop = Hop(node.peer_id, node.config.address, 0, 4)
        reqs = [
            StepRequest(sid, 0, [hop], Sampling(temperature=0), torch.tensor([PROMPTS[0]]))
            for sid in ("fine", "broken")
        ]
        try:
            r = await node.http.post(f"http://{node.config.address}{PATH_STEPS}", content=encode_steps(reqs))
            return r.status_code, r.json()["results"]
        finally:
            await stop_swarm(nodes)

    status, (fine, broken) = asyncio.run(main())
    assert status == 200
    assert fine["tokens"] and "RuntimeError" in broken["error"]["message"]


def test_core_turns_refuse_an_unknown_mode():
    with pytest.raises(ValueError, match="core_turns must be one of auto, on, off"):
        NodeConfig(core_turns="sometimes")
