"""A lean hop: a peer's steps messages to a next peer travel over one persistent websocket per
address (the `websockets` package; uvicorn serves the other end), instead of one HTTP request a
message: no request line, headers or connection handling per step.

A message is `id (8 bytes) | header length (4) | header (JSON: the swarm signature of the body,
when the swarm has a key; `kind`: "results" for the results of steps returned directly to an
entry, else a steps message) | body` (the body as POST /swarm/steps, or /swarm/results, takes
it); the answer is `id (8) | status (2) | JSON`, the same JSON as that POST's. Answers may come back in any order
(steps that run the rest of a route take longer); at most MAX_INFLIGHT messages are open on a
connection, and a receiver reads no more while it runs that many (back-pressure). A private
swarm signs the handshake and every message (peers/transport/auth.py checks them: a bad one
closes the connection). Where a next peer does not take a websocket (an older peer, a proxy,
no `websockets` installed), its steps go by HTTP, and the stream is tried again RETRY_S later.
"""

import asyncio
import itertools
import logging
import time

import httpx

from peers.transport.auth import sign_headers
from peers.transport.limits import error_body
from peers.transport.stream_format import (
    PATH_STEPS_STREAM,
    SIGNED_PATHS,
    StreamFormatError,
    message_kind,
    parse_stream_answer,
    parse_stream_message,
    stream_answer,
    stream_message,
)

log = logging.getLogger("layerswarm.forwarding")

MAX_INFLIGHT = 64  # messages open on one connection
CONNECT_TIMEOUT_S = 2.0
RETRY_S = 60.0  # after a failed connect, a peer's steps go by HTTP this long
IDLE_S = 300.0  # a receiver closes a stream that carried no message this long (none running)


class NotSent(Exception):
    """The connection was gone before the message left: it may go another way."""


class Connection:
    """One websocket to one peer: messages out, answers matched back by id."""

    def __init__(self, address: str, ws):
        self.address, self.ws = address, ws
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.slots = asyncio.Semaphore(MAX_INFLIGHT)
        self.closed = False
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                msg_id, status, reply = parse_stream_answer(data)
                future = self.pending.pop(msg_id, None)
                if future is not None and not future.done():
                    future.set_result((status, reply))
        except Exception as e:  # closed, or a malformed answer: the connection is done
            log.debug("steps stream to %s closed: %s", self.address, e)
        finally:
            self.closed = True
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(
                        httpx.RemoteProtocolError(f"the steps stream to {self.address} closed")
                    )
            self.pending.clear()

    async def post(self, headers: dict[str, str], body: bytes, timeout_s: float) -> httpx.Response:
        async with self.slots:
            if self.closed:
                raise NotSent()
            msg_id = next(self.ids)
            future = asyncio.get_running_loop().create_future()
            self.pending[msg_id] = future
            try:
                try:
                    await asyncio.wait_for(self.ws.send(stream_message(msg_id, headers, body)), timeout_s)
                except TimeoutError:
                    raise httpx.WriteTimeout(f"the steps stream to {self.address} took no message") from None
                except Exception as e:
                    self.closed = True
                    raise NotSent() from e
                try:
                    status, reply = await asyncio.wait_for(future, timeout_s)
                except TimeoutError:
                    raise httpx.ReadTimeout(f"no answer on the steps stream to {self.address}") from None
            finally:
                self.pending.pop(msg_id, None)
        return httpx.Response(status, content=reply, headers={"content-type": "application/json"})

    async def close(self) -> None:
        self.closed = True
        try:
            await self.ws.close()
        except Exception:
            pass
        self.reader.cancel()


class Streams:
    """A peer's steps streams, one per next peer's address (see the module's docstring)."""

    def __init__(self, key: bytes | None, max_reply_bytes: int, clock=time.monotonic):
        """`key`: a private swarm's key (the handshake and every message signed with it)."""
        self.key, self.max_reply_bytes, self.clock = key, max_reply_bytes, clock
        self._conns: dict[str, Connection] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self._http_until: dict[str, float] = {}
        self.connects = 0  # streams opened
        self.messages = 0  # messages sent over streams
        self.results_messages = 0  # of which results of steps returned directly
        self.fallbacks = 0  # messages that went by HTTP because a stream could not be had

    def sign(self, method: str, body: bytes, kind: str = "steps") -> dict[str, str]:
        """The swarm signature of the handshake ("GET", b"") or a message ("POST", its body, and
        what it carries: the signature covers its kind)."""
        return sign_headers(self.key, method, SIGNED_PATHS[kind], body) if self.key else {}

    def to_json(self) -> dict:
        return {
            "open": sum(not c.closed for c in self._conns.values()),
            "connects": self.connects,
            "messages": self.messages,
            "results_messages": self.results_messages,
            "http_fallbacks": self.fallbacks,
        }

    async def post(
        self, address: str, body: bytes, timeout_s: float, kind: str = "steps"
    ) -> httpx.Response | None:
        """Send one message to `address` (a steps message, or the results of steps returned
        directly to the entry there: `kind`) and return its answer as an HTTP response would be;
        None where no stream can be had (the caller sends it by HTTP)."""
        headers = {"kind": kind} if kind != "steps" else {}
        for _ in range(2):  # a connection that died since its last message is opened again once
            conn = await self._connection(address)
            if conn is None:
                self.fallbacks += 1
                return None
            try:
                response = await conn.post({**headers, **self.sign("POST", body, kind)}, body, timeout_s)
            except NotSent:
                self._conns.pop(address, None)
                continue
            self.messages += 1
            self.results_messages += kind == "results"
            return response
        self.fallbacks += 1
        return None

    async def _connection(self, address: str) -> Connection | None:
        conn = self._conns.get(address)
        if conn is not None and not conn.closed:
            return conn
        if self.clock() < self._http_until.get(address, 0.0):
            return None
        if address in self._connecting:  # (one handshake per address at a time)
            return await asyncio.shield(self._connecting[address])
        future = asyncio.get_running_loop().create_future()
        self._connecting[address] = future
        conn = None
        try:
            conn = await self._open(address)
            if conn is None:
                self._http_until[address] = self.clock() + RETRY_S
            else:
                self._conns[address] = conn
                self.connects += 1
        finally:
            del self._connecting[address]
            future.set_result(conn)  # (also when this task is cancelled: nobody waits for ever)
        return conn

    async def _open(self, address: str) -> Connection | None:
        try:
            from websockets.asyncio.client import connect
        except ImportError:
            return None
        try:
            ws = await asyncio.wait_for(
                connect(
                    f"ws://{address}{PATH_STEPS_STREAM}",
                    additional_headers=self.sign("GET", b""),
                    max_size=self.max_reply_bytes,
                    compression=None,
                    open_timeout=CONNECT_TIMEOUT_S,
                    close_timeout=CONNECT_TIMEOUT_S,  # (a peer that does not answer the close is not waited for)
                    ping_interval=None,
                    proxy=None,
                ),
                CONNECT_TIMEOUT_S,
            )
        except Exception as e:
            log.info("no steps stream to %s (%s: %s): its steps go by HTTP", address, type(e).__name__, e)
            return None
        return Connection(address, ws)

    async def close(self) -> None:
        for conn in list(self._conns.values()):
            await conn.close()
        self._conns.clear()


async def serve_stream(ws, handlers: dict, max_message_bytes: int) -> None:
    """The receiving end of a steps stream (a starlette WebSocket): each message's body goes to
    the handler of its kind, `handlers[kind](body, host) -> (status, reply)`, as POST
    /swarm/steps (or /swarm/results) would take it; answers go back as they are ready. At most MAX_INFLIGHT messages run at once: past that the stream is not read
    (the sender's messages wait in the TCP window). A malformed message closes the stream, and so
    does IDLE_S without a message while none runs."""
    from starlette.websockets import WebSocketDisconnect

    await ws.accept()
    host = ws.client.host if ws.client else ""
    sending, running = asyncio.Lock(), set()
    slots = asyncio.Semaphore(MAX_INFLIGHT)

    async def answer(msg_id: int, handle, body: bytes) -> None:
        try:
            if len(body) > max_message_bytes:  # (as BodyLimits answers POST /swarm/steps)
                why = f"the steps message has {len(body)} bytes; the limit here is {max_message_bytes}"
                status, reply = 413, error_body(why, "too_large")
            else:
                status, reply = await handle(body, host)
            async with sending:
                await ws.send_bytes(stream_answer(msg_id, status, reply))
        except Exception as e:  # the stream closed meanwhile, or a bug: the sender times out or fails over
            log.debug("steps stream answer to %s failed: %s", host, e)
        finally:
            slots.release()

    try:
        while True:
            try:  # (an idle stream holds a connection: it is closed, and opened again when needed)
                data = await asyncio.wait_for(ws.receive_bytes(), None if running else IDLE_S)
            except TimeoutError:
                await ws.close()
                return
            msg_id, headers, body = parse_stream_message(data)
            handle = handlers.get(message_kind(headers))
            if handle is None:
                raise StreamFormatError(f"this peer takes no {message_kind(headers)} messages on a stream")
            await slots.acquire()
            task = asyncio.ensure_future(answer(msg_id, handle, body))
            running.add(task)
            task.add_done_callback(running.discard)
    except (WebSocketDisconnect, RuntimeError, KeyError):  # (a text frame is a KeyError for receive_bytes)
        pass
    except StreamFormatError as e:
        log.warning("steps stream from %s closed: %s", host, e)
        await ws.close(code=1003)
    finally:
        for task in running:
            task.cancel()
