"""Who may talk to this peer: a private swarm's shared key on every peer-to-peer request, and
API keys on the OpenAI door, the metrics key on /metrics, and who asked the request being served
(its API key, else its host: the partition of the prefix cache it may reuse). One place, used by
the server (checks), forwarding and gossip (the peer's HTTP client signs) alike.

Peer-to-peer requests (`/swarm/...`) of a swarm started with a key carry
`x-swarm-time`, `x-swarm-nonce` and `x-swarm-auth` = HMAC-SHA256(key, method, path, time, nonce,
SHA-256 of the body). A request without a valid one gets 401 before its body is parsed or
anything is computed: its time must be within WINDOW_S of this peer's clock, its nonce unseen
within that window (a replayed request is refused), and the MAC is compared in constant time.
"""

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar

import httpx

from peers.transport.limits import json_error
from peers.transport.stream_format import SIGNED_PATHS, StreamFormatError, message_kind, parse_stream_message

log = logging.getLogger("layerswarm.auth")

SWARM_PREFIX = "/swarm/"
API_PREFIX = "/v1/"
WINDOW_S = 30.0
MIN_KEY_CHARS = 16
MAX_NONCES = 1 << 20  # signed requests remembered for replay checks (within WINDOW_S)
SWARM_KEY_ENV = "LAYERSWARM_SWARM_KEY"
H_TIME, H_NONCE, H_AUTH = "x-swarm-time", "x-swarm-nonce", "x-swarm-auth"
LOCAL = "local"  # the requester of work no HTTP request asked for (in-process callers)

# who asked the request being served: "key:<SHA-256 of its API key>" where the door takes API keys,
# else "host:<the client's address>"; set by Guard for the request's whole life
_REQUESTER: ContextVar[str] = ContextVar("requester", default=LOCAL)


def requester() -> str:
    """Who asked the request being served (its API key's digest, else its host), LOCAL outside
    one: entries partition the prefix cache by it, so that no caller reuses another's prompt."""
    return _REQUESTER.get()


def swarm_key_from(value: str | None) -> bytes | None:
    """The swarm key of --swarm-key, else of LAYERSWARM_SWARM_KEY; None for an open swarm."""
    value = value if value is not None else os.environ.get(SWARM_KEY_ENV)
    if not value:
        return None
    if len(value) < MIN_KEY_CHARS:
        raise ValueError(f"a swarm key has at least {MIN_KEY_CHARS} characters, this one {len(value)}")
    return value.encode()


def _mac(key: bytes, method: str, path: str, stamp: str, nonce: str, body: bytes) -> str:
    digest = hashlib.sha256(body).hexdigest()
    message = "\n".join((method.upper(), path, stamp, nonce, digest)).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_headers(key: bytes, method: str, path: str, body: bytes, now: float | None = None) -> dict:
    stamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(16)
    return {H_TIME: stamp, H_NONCE: nonce, H_AUTH: _mac(key, method, path, stamp, nonce, body)}


class SwarmAuth(httpx.Auth):
    """httpx auth that signs every request of a peer's client with the swarm key."""

    requires_request_body = True

    def __init__(self, key: bytes):
        self.key = key

    def auth_flow(self, request: httpx.Request):
        request.headers.update(sign_headers(self.key, request.method, request.url.path, request.content))
        yield request


class ReplayCache:
    """Nonces seen within the window (bounded; the oldest go first)."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.time):
        self.window_s, self.clock = window_s, clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_time(self, nonce: str) -> bool:
        now = self.clock()
        while self._seen and (
            next(iter(self._seen.values())) < now - 2 * self.window_s or len(self._seen) >= MAX_NONCES
        ):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


class Guard:
    """ASGI middleware: `/swarm/...` requests must be signed with the swarm key (when there is
    one), `/v1/...` requests must carry one of the API keys (when there are any), `/metrics` the
    metrics key (when there is one); every request runs as its requester (see `requester`)."""

    def __init__(
        self,
        app,
        swarm_key: bytes | None,
        api_keys: tuple[str, ...] = (),
        clock=time.time,
        metrics: tuple[str, str] | None = None,
    ):
        """`metrics`: (the metrics path, the key it needs), or None where it is open."""
        self.app, self.swarm_key, self.api_keys, self.clock = app, swarm_key, api_keys, clock
        self.metrics = metrics
        self.replays = ReplayCache(clock=clock)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and scope["path"].startswith(SWARM_PREFIX) and self.swarm_key:
            return await self._websocket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith(API_PREFIX) and self.api_keys:
            why = self._api_key_problem(scope)
            if why:
                return await self._refuse(send, why, "invalid_request_error", "invalid_api_key")
        elif self.metrics is not None and path == self.metrics[0]:
            why = self._metrics_key_problem(scope)
            if why:
                return await self._refuse(send, why, "authentication_error", "invalid_metrics_key")
        elif path.startswith(SWARM_PREFIX) and self.swarm_key is not None:
            headers = _headers(scope)
            why = self._stamp_problem(headers)
            if why:
                return await self._refuse(send, why, "authentication_error", "invalid_swarm_auth")
            body, receive = await _read_body(receive)
            if body is None:
                return  # the client went away (or BodyLimits already answered)
            why = self._signature_problem(headers, scope["method"], path, body)
            if why:
                return await self._refuse(send, why, "authentication_error", "invalid_swarm_auth")
        await self._as_requester(scope, receive, send)

    async def _as_requester(self, scope, receive, send) -> None:
        """The app, run as the request's requester (see `requester`)."""
        as_requester = _REQUESTER.set(self._requester(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            _REQUESTER.reset(as_requester)

    def _signature_problem(self, headers: dict, method: str, path: str, body: bytes) -> str | None:
        """Why a stamped request (or stream message) is not this swarm's, or None."""
        expected = _mac(self.swarm_key, method, path, headers[H_TIME], headers[H_NONCE], body)
        if not hmac.compare_digest(expected, headers[H_AUTH]):
            return "the request is not signed with this swarm's key"
        if not self.replays.first_time(headers[H_NONCE]):
            return "this signed request was seen before (a replay)"
        return None

    async def _websocket(self, scope, receive, send):
        """A private swarm's steps stream (peers/transport/stream.py): the handshake and every
        message signed; a bad one is refused (before the handshake: 403) or closes the stream."""
        path = scope["path"]
        headers = _headers(scope)
        why = self._stamp_problem(headers) or self._signature_problem(headers, "GET", path, b"")
        if why:
            log.warning("steps stream refused: %s", why)
            return await send({"type": "websocket.close", "code": 1008})

        async def checked() -> dict:
            message = await receive()
            if message["type"] == "websocket.receive":
                why = self._message_problem(message.get("bytes"))
                if why:
                    log.warning("steps stream closed: %s", why)
                    await send({"type": "websocket.close", "code": 1008})
                    return {"type": "websocket.disconnect", "code": 1008}
            return message

        await self._as_requester(scope, checked, send)

    def _message_problem(self, data: bytes | None) -> str | None:
        try:
            _, headers, body = parse_stream_message(data)
            signed = SIGNED_PATHS[message_kind(headers)]  # (over the kind's path: a kind changed breaks it)
        except StreamFormatError as e:
            return str(e)
        headers = {k.lower(): v for k, v in headers.items()}
        return self._stamp_problem(headers) or self._signature_problem(headers, "POST", signed, body)

    def _requester(self, scope) -> str:
        """The API key of a /v1/ request where the door takes keys (checked by now), else the host."""
        token = _bearer(scope)
        if self.api_keys and scope["path"].startswith(API_PREFIX) and token:
            return "key:" + hashlib.sha256(token.encode()).hexdigest()
        client = scope.get("client")
        return f"host:{client[0] if client else ''}"

    def _api_key_problem(self, scope) -> str | None:
        token = _bearer(scope)
        if not token:
            return "no API key was given; send it as 'Authorization: Bearer KEY'"
        if not any(hmac.compare_digest(token.encode(), key.encode()) for key in self.api_keys):
            return "the API key given is not one of this peer's keys"
        return None

    def _metrics_key_problem(self, scope) -> str | None:
        path, key = self.metrics
        token = _bearer(scope)
        if not token:
            return f"{path} needs this peer's metrics key; send it as 'Authorization: Bearer KEY'"
        if not hmac.compare_digest(token.encode(), key.encode()):
            return f"the key given is not this peer's metrics key ({path})"
        return None

    def _stamp_problem(self, headers: dict) -> str | None:
        if not all(headers.get(h) for h in (H_TIME, H_NONCE, H_AUTH)):
            return (
                f"this swarm is private: peer-to-peer requests must be signed ({H_TIME}, {H_NONCE}, {H_AUTH})"
            )
        try:
            stamp = float(headers[H_TIME])
        except ValueError:
            return f"{H_TIME} is not a time"
        skew = abs(self.clock() - stamp)
        if not skew <= WINDOW_S:  # also refuses NaN
            return f"the request was signed {skew:.0f} s away from this peer's clock (at most {WINDOW_S:g} s)"
        nonce = headers[H_NONCE]
        if not 16 <= len(nonce) <= 64 or not all(c in "0123456789abcdef" for c in nonce):
            return f"{H_NONCE} must be 16 to 64 hex digits"
        if len(headers[H_AUTH]) != 64:
            return f"{H_AUTH} must be an HMAC-SHA256 in hex"
        return None

    async def _refuse(self, send, message: str, kind: str, code: str) -> None:
        for part in json_error(401, message, code, kind, close=False):
            await send(part)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def _bearer(scope) -> str:
    """The token of an 'Authorization: Bearer TOKEN' header ("" without one)."""
    scheme, _, token = _headers(scope).get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _read_body(receive):
    """The whole body, and a receive that hands it to the app again."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, receive
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body, sent = b"".join(parts), False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay
