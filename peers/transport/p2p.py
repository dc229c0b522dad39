"""Peer-to-peer streams through libp2p (py-libp2p, the `p2p` extra), for peers that cannot be
dialled at an address of their own (README "Networks"): the engine that will carry steps through
NATs, by relay (circuit relay v2) or hole punching (DCUtR), end to end encrypted (Noise) and
keyed by the peer's own Ed25519 identity, so that its libp2p peer id is the same key as its
LayerSwarm peer id.

py-libp2p runs on trio; a peer runs on asyncio. A P2PNode keeps the libp2p host on a trio loop
in a thread of its own and hands work across without blocking either loop: asyncio -> trio
through the trio token's `run_sync_soon`, trio -> asyncio through `call_soon_threadsafe`.

Requests to one peer share one persistent libp2p stream (opening a stream costs a protocol
negotiation: ~17 ms a request on loopback when each had its own): `id (8) | length (4) | body`
out, `id (8) | length (4) | answer` back, answers in any order; the answering side runs the
asyncio handler it was given for each (at most MAX_INFLIGHT at once on a stream: past that it
reads no more, back-pressure) and bounds what it reads (`max_bytes`). This module is the transport
room's libp2p door; routing through it is built on it.
"""

import asyncio
import contextlib
import logging
import struct
import threading
from collections.abc import Awaitable, Callable

log = logging.getLogger("layerswarm.p2p")

PROTOCOL = "/layerswarm/steps/1"
MAX_INFLIGHT = 64  # requests open on one stream
# what a relaying peer gives others (circuit relay v2): circuits live an hour and carry at most
# 1 GiB each, 16 at once, for at most 16 peers holding reservations
RELAY_LIMITS = dict(duration=3600, data=1 << 30, max_circuit_conns=16, max_reservations=16)
HEADER = struct.Struct(">QI")  # id, length
OK, FAILED = b"\x00", b"\x01"  # an answer's first byte
START_TIMEOUT_S = 10.0


class P2PUnavailable(RuntimeError):
    """The `p2p` extra (py-libp2p) is not installed."""


class P2PRequestFailed(RuntimeError):
    """The asked peer's handler failed the request (its answer says why)."""


def available() -> bool:
    try:
        import libp2p  # noqa: F401
    except ImportError:
        return False
    return True


async def _read_exact(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise EOFError(f"the stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def _read_message(stream, max_bytes: int) -> tuple[int, bytes]:
    msg_id, size = HEADER.unpack(await _read_exact(stream, HEADER.size))
    if size > max_bytes:
        raise ValueError(f"a message of {size} bytes; the limit is {max_bytes}")
    return msg_id, await _read_exact(stream, size)


class _Link:
    """One stream to one peer (trio side): requests out, answers matched back by id."""

    def __init__(self, stream):
        import trio

        self.stream, self.lock = stream, trio.Lock()
        self.pending: dict[int, object] = {}  # id -> trio.Event, set when its answer came (or never will)
        self.answers: dict[int, bytes] = {}
        self.ids = 0
        self.closed, self.why = False, ""


class P2PNode:
    """A libp2p host on its own trio thread. `secret`: the peer's 32-byte Ed25519 private key;
    `handler(body, remote_peer_id) -> answer`: an asyncio coroutine, run on the loop that
    started the node for each request that comes in."""

    def __init__(
        self,
        secret: bytes,
        handler: Callable[[bytes, str], Awaitable[bytes]],
        listen: str = "/ip4/127.0.0.1/tcp/0",
        max_bytes: int = 64 << 20,
        relay: bool = False,
    ):
        if not available():
            raise P2PUnavailable("peer-to-peer streams need the p2p extra: pip install 'layerswarm[p2p]'")
        self.secret, self.handler, self.listen, self.max_bytes = secret, handler, listen, max_bytes
        self.relay = relay  # relays circuits for others, within RELAY_LIMITS
        self._circuits = None  # circuit relay v2: the protocol, the transport, reservations
        self.peer_id = ""  # libp2p's spelling (12D3KooW...), once started
        self.addrs: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token = None  # the trio loop's token: how asyncio hands it work
        self._host = None
        self._nursery = None
        self._stop = None
        self._thread: threading.Thread | None = None
        self._links: dict = {}  # peer id -> _Link, or a trio.Event while it opens
        self._waiting: set[asyncio.Future] = set()  # asyncio futures trio owes an outcome

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        started = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="p2p", daemon=True)
        self._thread.start()
        try:
            await asyncio.wait_for(started, START_TIMEOUT_S)
        except BaseException:
            await self.close()
            raise

    def _run(self, started: asyncio.Future) -> None:
        import trio

        def tell(fn, *args) -> None:
            if not started.done():
                self._loop.call_soon_threadsafe(fn, *args)

        try:
            trio.run(self._main, tell, started)
        except BaseException as e:  # (a failed start is the starter's error; a later one is logged)
            if started.done():
                log.error("the libp2p host stopped: %s: %s", type(e).__name__, e)
            else:
                self._loop.call_soon_threadsafe(_fail, started, e)
        finally:  # whatever still waits on this node will not be answered
            closed = EOFError("the p2p node closed")
            for future in list(self._waiting):
                self._loop.call_soon_threadsafe(_fail, future, closed)

    async def _main(self, tell, started) -> None:
        import multiaddr
        import trio
        from libp2p import new_host
        from libp2p.crypto.ed25519 import create_new_key_pair

        host = new_host(key_pair=create_new_key_pair(self.secret))
        self._host, self._stop = host, trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with (
            host.run(listen_addrs=[multiaddr.Multiaddr(self.listen)]),
            trio.open_nursery() as nursery,
            _circuits(host, self.relay) as circuits,
        ):
            self._nursery, self._circuits = nursery, circuits
            host.set_stream_handler(PROTOCOL, self._serve)
            self.peer_id = str(host.get_id())
            self.addrs = [str(a) for a in host.get_addrs()]
            tell(_done, started)
            await self._stop.wait()
            with trio.move_on_after(2):  # (its connections' sockets closed, not left to the collector)
                await host.get_network().close()
            nursery.cancel_scope.cancel()

    async def reserve(self, relay_id: str, relay_addrs: list[str], timeout_s: float = 10.0) -> str:
        """Take a reservation at a relaying peer, so that others reach this one through it;
        returns this peer's relayed address there (ConnectionError if the relay refused)."""
        return await self._on_trio(self._reserve, relay_id, relay_addrs, timeout_s, timeout_s=timeout_s + 1)

    async def _reserve(self, relay_id: str, relay_addrs: list[str], timeout_s: float) -> str:
        import multiaddr
        import trio
        from libp2p.peer.id import ID
        from libp2p.peer.peerinfo import PeerInfo

        peer = ID.from_base58(relay_id)
        with trio.fail_after(timeout_s):
            await self._host.connect(PeerInfo(peer, [multiaddr.Multiaddr(a) for a in relay_addrs]))
            discovery = self._circuits.discovery
            await discovery.discover_relays()
            if not await discovery.make_reservation(peer):
                raise ConnectionError(f"the relay {relay_id} refused a reservation")
        direct = next((a for a in relay_addrs if "/p2p-circuit" not in a), None)
        if direct is None:
            raise ValueError(f"no direct address of the relay {relay_id} among {relay_addrs}")
        direct = direct.split("/p2p/")[0]
        return f"{direct}/p2p/{relay_id}/p2p-circuit/p2p/{self.peer_id}"

    def relayed(self) -> dict:
        """What this peer relays for others now: reservations and open circuits."""
        if self._circuits is None:
            return {"reservations": 0, "circuits": 0}
        protocol = self._circuits.protocol
        return {
            "reservations": len(protocol.resource_manager._reservations),
            "circuits": len(protocol._active_relays),
        }

    async def _on_trio(self, fn, *args, timeout_s: float | None = None):
        """Run a trio coroutine function on the node's loop; wait for it here, on asyncio (for
        at most `timeout_s`). Its outcome always comes back: a result, its error, or EOFError
        when the node closes first."""
        future, loop = self._loop.create_future(), self._loop
        self._waiting.add(future)
        future.add_done_callback(self._waiting.discard)

        async def run() -> None:
            try:
                result = await fn(*args)
            except BaseException as e:  # (trio.Cancelled too: the node is closing)
                loop.call_soon_threadsafe(
                    _fail, future, e if isinstance(e, Exception) else EOFError("closed")
                )
                if not isinstance(e, Exception):
                    raise
                return
            loop.call_soon_threadsafe(_done, future, result)

        try:
            self._token.run_sync_soon(self._nursery.start_soon, run)
        except (RuntimeError, AttributeError):  # (trio.RunFinishedError; never started)
            future.cancel()
            raise EOFError("the p2p node is closed") from None
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            if not future.done():
                future.cancel()

    async def _serve(self, stream) -> None:
        """Requests from another peer on one stream: each body to the asyncio handler (up to
        MAX_INFLIGHT at once), each answer back with its id as it is ready."""
        import trio

        remote = str(stream.muxed_conn.peer_id)
        slots, lock = trio.Semaphore(MAX_INFLIGHT), trio.Lock()

        async def answer(msg_id: int, body: bytes) -> None:
            try:
                result = OK + await self._in_asyncio(self.handler(body, remote))
            except Exception as e:  # (its sender is told at once, not left to time out)
                log.info("a p2p request from %s failed: %s: %s", remote, type(e).__name__, e)
                result = FAILED + f"{type(e).__name__}: {e}".encode()[:1000]
            try:
                async with lock:
                    await stream.write(HEADER.pack(msg_id, len(result)) + result)
            except Exception as e:  # (the stream is gone: its sender finds out)
                log.debug("a p2p answer to %s was lost: %s", remote, e)
            finally:
                slots.release()

        try:
            async with trio.open_nursery() as nursery:
                while True:
                    msg_id, body = await _read_message(stream, self.max_bytes)
                    await slots.acquire()
                    nursery.start_soon(answer, msg_id, body)
        except Exception as e:  # the stream ended, or a malformed message: the stream is done
            log.debug("a p2p stream from %s closed: %s", remote, e)
            await stream.reset()

    async def _in_asyncio(self, coro):
        """Run an asyncio coroutine on the peer's loop; wait for it here, on trio."""
        import trio

        done, box, token = trio.Event(), {}, self._token

        def finished(task: asyncio.Future) -> None:
            box["task"] = task
            if not task.cancelled():
                task.exception()  # (retrieved here: its error goes back to the sender)
            try:
                token.run_sync_soon(done.set)
            except RuntimeError:  # (trio.RunFinishedError: the node closed meanwhile)
                pass

        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(coro).add_done_callback(finished))
        await done.wait()
        return box["task"].result()

    async def request(self, peer_id: str, addrs: list[str], body: bytes, timeout_s: float) -> bytes:
        """Send `body` to the peer `peer_id` (libp2p's spelling) known at `addrs` (multiaddrs)
        and return its answer (P2PRequestFailed if its handler failed there)."""
        if len(body) > self.max_bytes:
            raise ValueError(f"a message of {len(body)} bytes; the limit is {self.max_bytes}")
        try:
            answer = await self._on_trio(self._ask, peer_id, addrs, body, timeout_s, timeout_s=timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no answer from {peer_id} within {timeout_s:g} s") from None
        status, answer = answer[:1], answer[1:]
        if status != OK:
            raise P2PRequestFailed(f"{peer_id} failed the request: {answer.decode(errors='replace')}")
        return answer

    async def _ask(self, peer_id: str, addrs: list[str], body: bytes, timeout_s: float) -> bytes:
        import trio

        with trio.move_on_after(timeout_s) as deadline:
            link = await self._link(peer_id, addrs, timeout_s)
            answered = trio.Event()
            async with link.lock:
                link.ids += 1
                msg_id = link.ids
                link.pending[msg_id] = answered
                await link.stream.write(HEADER.pack(msg_id, len(body)) + body)
            try:
                await answered.wait()
            finally:
                link.pending.pop(msg_id, None)  # (answered, timed out or closed: never left behind)
        if deadline.cancelled_caught:
            raise TimeoutError(f"no answer from {peer_id} within {timeout_s:g} s")
        if link.closed and msg_id not in link.answers:
            raise EOFError(f"the p2p stream to {peer_id} closed: {link.why}")
        return link.answers.pop(msg_id)

    async def _link(self, peer_id: str, addrs: list[str], timeout_s: float) -> _Link:
        """The open stream to `peer_id`, or a new one (one opening per peer at a time)."""
        import multiaddr
        import trio
        from libp2p.peer.id import ID
        from libp2p.peer.peerinfo import PeerInfo

        while True:
            link = self._links.get(peer_id)
            if isinstance(link, _Link) and not link.closed:
                return link
            if link is None or isinstance(link, _Link):
                break
            await link.wait()  # (another request is opening it)
        opening = self._links[peer_id] = trio.Event()
        try:
            with trio.fail_after(timeout_s):
                peer = ID.from_base58(peer_id)
                relayed = [a for a in addrs if "/p2p-circuit" in a]
                if relayed and not self._host.get_network().get_connections(peer):
                    await self._circuits.transport.dial(multiaddr.Multiaddr(relayed[0]))
                else:
                    await self._host.connect(PeerInfo(peer, [multiaddr.Multiaddr(a) for a in addrs]))
                stream = await self._host.new_stream(peer, [PROTOCOL])
        except BaseException:
            del self._links[peer_id]
            raise
        finally:
            opening.set()
        link = self._links[peer_id] = _Link(stream)
        self._nursery.start_soon(self._read_answers, peer_id, link)
        return link

    async def _read_answers(self, peer_id: str, link: _Link) -> None:
        try:
            while True:
                msg_id, answer = await _read_message(link.stream, self.max_bytes + 1)
                answered = link.pending.get(msg_id)
                if answered is not None:  # (else its asker gave up)
                    link.answers[msg_id] = answer
                    answered.set()
        except BaseException as e:
            link.closed, link.why = True, str(e) or type(e).__name__
            if self._links.get(peer_id) is link:
                del self._links[peer_id]
            for answered in link.pending.values():
                answered.set()
            if not isinstance(e, Exception):
                raise

    async def close(self) -> None:
        if self._token is not None and self._stop is not None:
            try:
                self._token.run_sync_soon(self._stop.set)
            except RuntimeError:  # (the trio loop has already ended)
                pass
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, START_TIMEOUT_S)


class _Circuits:
    def __init__(self, protocol, transport, discovery):
        self.protocol, self.transport, self.discovery = protocol, transport, discovery


@contextlib.asynccontextmanager
async def _circuits(host, relay: bool):
    """Circuit relay v2 on `host`: it takes relayed connections (and makes them); with `relay`,
    it also relays for others within RELAY_LIMITS."""
    from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
    from libp2p.relay.circuit_v2.discovery import RelayDiscovery
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID, STOP_PROTOCOL_ID, CircuitV2Protocol
    from libp2p.relay.circuit_v2.resources import RelayLimits
    from libp2p.relay.circuit_v2.transport import CircuitV2Transport
    from libp2p.tools.anyio_service import background_trio_service

    limits = RelayLimits(**RELAY_LIMITS)
    protocol = CircuitV2Protocol(host, limits=limits, allow_hop=relay)
    host.set_stream_handler(PROTOCOL_ID, protocol._handle_hop_stream)
    host.set_stream_handler(STOP_PROTOCOL_ID, protocol._handle_stop_stream)
    roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if relay else RelayRole(0))
    async with background_trio_service(protocol):
        transport = CircuitV2Transport(host, protocol, RelayConfig(roles=roles, limits=limits))
        discovery = RelayDiscovery(host, auto_reserve=False)
        transport.discovery = discovery
        async with background_trio_service(discovery):
            yield _Circuits(protocol, transport, discovery)


def _done(future: asyncio.Future, value=None) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
