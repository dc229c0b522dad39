"""The swarm page's data (`/view`) against addresses an attacker gossiped into a real peer's table
(any key may sign an entry in an open swarm): one fake peer trickles its /health a byte at a time,
another floods an endless body. /view answers within the bounded wait, twice in a row, showing
both as unreachable, and the peer's memory does not grow with the flood (each fails without the
view's total deadline and size cap: before them, /view stalled while the lock was held)."""

import asyncio
import threading
import time

import httpx

from peers.view import CACHE_S, HEALTH_TIMEOUT_S
from tests.peers.processes import Swarm, wait_until
from tests.peers.transport.test_hostile import gossip, signed_entry

VIEW_WAIT_S = 10 * HEALTH_TIMEOUT_S  # the bound on each /view; it needs ~HEALTH_TIMEOUT_S
TRICKLE_EVERY_S = 0.3  # under httpx's 1 s read timeout: a per-read timeout never fires
FLOOD_CHUNK = b" " * 65536  # JSON whitespace: never a whole answer, never an error
FLOOD_BYTES = 512 << 20  # what the flood offers on one connection, as fast as it is read
READ_AT_MOST = 32 << 20  # MAX_HEALTH_BYTES, and what the sockets' buffers hold on the way


class HostilePeers:
    """Two fake peers on loopback, served by a thread's event loop: `trickle` sends its headers,
    then a byte every TRICKLE_EVERY_S for ever; `flood` sends a chunked body of FLOOD_BYTES as
    fast as it is read (`flooded`: the most it got read on one /health request)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[asyncio.Server] = []
        self.asked = {"trickle": 0, "flood": 0}  # GET /health requests each received
        self.flooded = 0
        self.ports = {
            name: asyncio.run_coroutine_threadsafe(self._serve(name, send), self.loop).result(10)
            for name, send in (("trickle", self._trickle), ("flood", self._flood))
        }

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    async def _serve(self, name: str, send) -> int:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                health = (await reader.readuntil(b"\r\n\r\n")).startswith(b"GET /health ")
                self.asked[name] += health
                await send(writer, health)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    @staticmethod
    async def _trickle(writer: asyncio.StreamWriter, health: bool) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2000\r\n\r\n")
        while True:
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(TRICKLE_EVERY_S)

    async def _flood(self, writer: asyncio.StreamWriter, health: bool) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        frame, sent = b"%x\r\n%s\r\n" % (len(FLOOD_CHUNK), FLOOD_CHUNK), 0
        try:
            while sent < FLOOD_BYTES:
                writer.write(frame)
                await writer.drain()
                sent += len(FLOOD_CHUNK)
            writer.write(b"0\r\n\r\n")
        finally:
            if health:
                self.flooded = max(self.flooded, sent)

    def close(self) -> None:
        async def stop():
            for server in self.servers:
                server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_view_answers_in_time_with_a_trickling_and_a_flooding_peer_in_the_table(tiny_llama, tmp_path):
    swarm = Swarm(
        tiny_llama, tmp_path, ["--suspect-after", "60", "--dead-after", "120", "--tombstone", "240"]
    )
    fakes = HostilePeers()
    try:
        peer = swarm.add("0:4")
        swarm.wait_ready()
        assert httpx.get(f"{peer.url}/view", timeout=VIEW_WAIT_S).status_code == 200  # warmed up
        hostile = {fakes.address("trickle"), fakes.address("flood")}
        assert gossip(peer, [signed_entry(address) for address in hostile]).status_code == 200
        wait_until(lambda: hostile <= {p["address"] for p in peer.table()["peers"]}, 10)
        for round_ in range(2):
            time.sleep(CACHE_S + 0.2)  # this /view asks again rather than from the cache
            asked = dict(fakes.asked)
            began = time.monotonic()
            r = httpx.get(f"{peer.url}/view", timeout=VIEW_WAIT_S)  # a stall fails here
            print(f"/view {round_ + 1}: {time.monotonic() - began:.2f} s")
            assert r.status_code == 200, r.text
            rows = {row["address"]: row for row in r.json()["peers"]}
            for address in hostile:
                assert rows[address]["status"] not in ("dead", "left"), rows[address]
                assert (rows[address]["reachable"], rows[address]["health"]) == (False, None), rows[address]
            (me,) = [row for row in rows.values() if row["me"]]
            assert me["reachable"] is True, me  # the peer itself answers its /health
            assert all(fakes.asked[name] > asked[name] for name in asked), (round_, fakes.asked)
        print(f"the flood sent {fakes.flooded} bytes at most to one /health request")
        assert fakes.flooded < READ_AT_MOST, f"the peer read {fakes.flooded} bytes of the flood"
    finally:
        fakes.close()
        swarm.stop()
