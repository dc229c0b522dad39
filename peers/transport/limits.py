"""What a peer's HTTP server lets a client hold: body sizes (413 from the declared length, or
while reading), time to send a request's headers and body (a client that stalls is cut off), and
the number of open connections. Every peer listens to strangers; none of these may be unbounded.

- `BodyLimits` is ASGI middleware: a body over the path's cap gets 413 before the app sees it
  (from Content-Length at once, or as soon as the bytes read pass the cap), and a body that stops
  arriving for `read_timeout_s` gets 408; the app then sees a disconnect.
- `guarded_h11(...)` is uvicorn's HTTP/1.1 protocol with a connection cap (connections beyond it
  are closed as they open) and a header timeout (a connection that has not sent a whole
  request's headers within `header_timeout_s` of opening, or of its last response, is closed).
- `post_capped(...)`: what a peer reads of another peer's answer is bounded too, in size and in
  total time (a peer that answers gossip with an endless body must not fill its caller's memory).
"""

import asyncio
import json
from collections.abc import Callable

import httpx
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_MAX_BODY_BYTES = 4 << 20  # an OpenAI request, gossip, a close
DEFAULT_READ_TIMEOUT_S = 10.0  # the longest pause while a body arrives
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 2048
MAX_REPLY_BYTES = 4 << 20  # a gossip or steps reply from another peer


class ReplyTooLarge(httpx.HTTPError):
    """Another peer's answer passed the size a peer reads."""


def error_body(
    message: str, code: str | None, kind: str = "invalid_request_error", param: str | None = None
) -> dict:
    """An error answer's JSON in OpenAI's shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def json_error(
    status: int,
    message: str,
    code: str | None,
    kind: str = "invalid_request_error",
    close: bool = True,
    param: str | None = None,
) -> tuple[dict, dict]:
    """The two ASGI messages of an error answer in OpenAI's JSON shape, sent by middleware
    before (or instead of) the app."""
    body = json.dumps(error_body(message, code, kind, param)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    start = {"type": "http.response.start", "status": status, "headers": headers}
    return start, {"type": "http.response.body", "body": body}


class BodyLimits:
    """ASGI middleware: caps a request body's size (`cap_for(path)` bytes) and the pauses while
    it arrives (`read_timeout_s`)."""

    def __init__(self, app, cap_for: Callable[[str], int], read_timeout_s: float = DEFAULT_READ_TIMEOUT_S):
        self.app, self.cap_for, self.read_timeout_s = app, cap_for, read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = self.cap_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > cap:
            for message in json_error(
                413, f"the request body has {declared} bytes; the limit here is {cap}", "too_large"
            ):
                await send(message)
            return
        state = {"read": 0, "done": False, "answered": False}

        async def answer(status: int, message: str, code: str) -> dict:
            if not state["answered"]:
                state["answered"] = True
                for part in json_error(status, message, code):
                    await send(part)
            return {"type": "http.disconnect"}

        async def guarded_receive():
            if state["answered"]:
                return {"type": "http.disconnect"}
            if state["done"]:
                return await receive()  # e.g. a streaming response waiting for a disconnect
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                return await answer(
                    408, f"the request body stopped arriving for {self.read_timeout_s:g} s", "timeout"
                )
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > cap:
                    return await answer(
                        413, f"the request body passed {cap} bytes, the limit here", "too_large"
                    )
                state["done"] = not message.get("more_body", False)
            return message

        async def guarded_send(message):
            if not state["answered"]:  # after a 413 or 408, the app's own answer is dropped
                await send(message)

        await self.app(scope, guarded_receive, guarded_send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def guarded_h11(max_connections: int, header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and a header timeout (see the module)."""

    class GuardedH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            if len(self.connections) > max_connections:
                transport.close()  # over the cap: closed as it opens
                return
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            self._header_timer = None
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing():
                self.transport.close()  # no whole request's headers in time

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def handle_websocket_upgrade(self, event) -> None:
            if self._header_timer is not None:  # (a steps stream lives on: its headers came in time)
                self._header_timer.cancel()
                self._header_timer = None
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc) -> None:
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return GuardedH11


async def post_capped(
    http: httpx.AsyncClient, url: str, timeout_s: float, cap: int = MAX_REPLY_BYTES, **kw
) -> httpx.Response:
    """POST, and read at most `cap` bytes of the answer within `timeout_s` in all (ReplyTooLarge,
    or httpx.ReadTimeout: both httpx errors, as a failed exchange would raise)."""
    return await fetch_capped(http, "POST", url, timeout_s, cap, **kw)


async def fetch_capped(
    http: httpx.AsyncClient, method: str, url: str, timeout_s: float, cap: int = MAX_REPLY_BYTES, **kw
) -> httpx.Response:
    """Send `method`, and read at most `cap` bytes of the answer within `timeout_s` in all
    (ReplyTooLarge, or httpx.ReadTimeout): a trickling or flooding peer costs a bounded wait
    and bounded memory."""

    async def exchange() -> httpx.Response:
        async with http.stream(method, url, timeout=timeout_s, **kw) as r:
            declared = r.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise ReplyTooLarge(f"{url} answered {declared} bytes; at most {cap} are read")
            body = bytearray()
            async for chunk in r.aiter_bytes():  # decoded: a compressed answer counts as it expands
                body += chunk
                if len(body) > cap:
                    raise ReplyTooLarge(f"{url} answered more than {cap} bytes")
        skip = {"content-encoding", "content-length", "transfer-encoding"}
        headers = [(k, v) for k, v in r.headers.items() if k.lower() not in skip]
        return httpx.Response(r.status_code, headers=headers, content=bytes(body), request=r.request)

    try:
        return await asyncio.wait_for(exchange(), timeout_s)
    except TimeoutError:
        raise httpx.ReadTimeout(f"{url} did not answer in full within {timeout_s:.1f} s") from None
