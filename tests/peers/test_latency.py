"""The delay proxy that stands in for a WAN link (this kernel has no netem), and a swarm whose
peers all sit behind one: every byte between peers pays the delay, and the output is still the
monolithic model's."""

import asyncio
import subprocess
import sys
import time

import httpx
from transformers import AutoTokenizer

from tests.helpers import greedy_reference, monolithic
from tests.peers.swarm import ROOT, Swarm, free_port, wait_until


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
