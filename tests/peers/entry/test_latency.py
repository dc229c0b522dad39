"""Latency: the delay proxy that stands in for a WAN link (this kernel has no netem), a swarm
whose peers all sit behind one (the output is still the monolithic model's), and routes that
avoid a much slower replica by what the peers measure and publish."""

import asyncio
import subprocess
import sys
import time

import httpx
from transformers import AutoTokenizer

from tests.helpers import greedy_reference, monolithic
from tests.peers.processes import ROOT, Swarm, free_port, wait_until
from tests.peers.test_inprocess import start_swarm, stop_swarm, tokens_of


def test_the_proxy_delays_every_byte_in_order_both_ways():
    async def main():
        async def echo(reader, writer):
            try:
                while data := await reader.read(1 << 16):
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()
                await asyncio.gather(writer.wait_closed(), return_exceptions=True)

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        target = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        listen = f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "tests.delay_proxy", "--listen", listen, "--to", target]
        proxy = subprocess.Popen([*cmd, "--delay-ms", "50", "--jitter-ms", "5"], cwd=ROOT)
        try:
            for _ in range(100):
                try:
                    reader, writer = await asyncio.open_connection(*listen.split(":"))
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            payload = bytes(range(256)) * 4096  # 1 MiB, many chunks
            t0 = time.perf_counter()
            writer.write(payload)
            await writer.drain()
            got = await reader.readexactly(len(payload))
            elapsed = time.perf_counter() - t0
            writer.close()
            await asyncio.gather(writer.wait_closed(), return_exceptions=True)
            return got == payload, elapsed
        finally:
            proxy.terminate()
            proxy.wait(10)
            server.close()
            await server.wait_closed()

    same, elapsed = asyncio.run(main())
    assert same  # every byte, in order
    assert elapsed >= 2 * 0.045  # there and back, each at least the delay less the jitter


def test_a_swarm_behind_delay_proxies_gives_the_monolithic_text(tiny_llama, tmp_path):
    model = monolithic(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    swarm = Swarm(tiny_llama, tmp_path)
    try:
        for layers in ("0:1", "1:3", "3:4"):
            swarm.add(layers, delay_ms=5, jitter_ms=1)
        swarm.wait_ready()
        swarm.wait_route(swarm.peers[0])
        table = swarm.peers[0].table()
        addresses = {p["address"] for p in table["peers"]}
        assert addresses == {p.public for p in swarm.peers}, table  # others dial the proxies
        body = {"model": "llama", "prompt": "hello swarm", "max_tokens": 16, "temperature": 0}
        r = httpx.post(f"{swarm.peers[0].url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        expected = tok.decode(
            greedy_reference(model, tok.encode("hello swarm"), 16, eos=2), skip_special_tokens=True
        )
        assert r.json()["choices"][0]["text"] == expected
        wait_until(lambda: all(p.health()["sessions"] == 0 for p in swarm.peers), 10)
    finally:
        swarm.stop()


def test_peers_publish_their_speed_and_links_and_routes_avoid_a_slow_replica(tiny_llama):
    """Each peer publishes its compute time per layer and its round-trip times in its entry; an
    entry routes around a replica that computes much slower than the other."""

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:4", "0:2", "0:2", "2:4"])  # entry, 2 replicas, tail
        entry, fast, slow, tail = nodes
        try:
            entry.bans.ban(entry.peer_id, entry.table.me.incarnation)  # keep the entry off routes
            for i in range(40):  # until both replicas have served (rendezvous spreads the keys)
                await tokens_of(entry, [i + 100, 7, 9], 4)
                if fast.steps_served and slow.steps_served:
                    break
            slow.speed.update = lambda *args: 500.0  # as if its layers took 500 ms each (a margin that
            # round-trip times measured on a loaded machine cannot outweigh)
            while any(n.block.open_sessions() for n in nodes):  # (published loads would steer routes too)
                await asyncio.sleep(0.01)
            for node in nodes:
                node._gossip_task.cancel()  # the tables stay as the rounds below leave them
            for _ in range(2):
                for node in nodes:
                    node._housekeeping()
                await asyncio.gather(*(n.gossip.round([], fanout_all=True) for n in nodes))
            published = {n.peer_id: entry.table.get(n.peer_id) for n in (fast, slow, tail)}
            served = slow.steps_served
            for i in range(8):
                await tokens_of(entry, [i + 1, 2, 3], 3)
            return (
                published,
                entry.table.me,
                slow.steps_served - served,
                fast.peer_id,
                slow.peer_id,
                tail.peer_id,
            )
        finally:
            await stop_swarm(nodes)

    published, me, slow_steps, fast_id, slow_id, tail_id = asyncio.run(main())
    assert all(e.layer_ms > 0 for e in published.values()), published
    assert published[next(iter(published))].layer_ms < 50
    assert {pid for pid, _ in me.links} >= {fast_id, slow_id}  # the entry timed its first hops
    assert all(
        any(pid == tail_id for pid, _ in published[r].links) for r in (fast_id, slow_id)
    )  # replicas timed the tail
    assert slow_steps == 0  # 8 new keys, none routed to the slow replica
