"""The Python SDK: talk to any peer of a swarm, given as HOST:PORT or as OpenAI's base URL.

    from peers import AsyncSwarmClient, SwarmClient
    client = SwarmClient("http://127.0.0.1:7001/v1")  # or "127.0.0.1:7001"
    print(client.chat("What is the capital of France?", max_tokens=32).text)
    for delta in client.chat("Tell me a story", stream=True):
        print(delta, end="")
    async with AsyncSwarmClient("127.0.0.1:7001") as client:  # in a coroutine
        async for delta in await client.chat("Tell me a story", stream=True): ...

SwarmAPIError             the swarm answered with an error (.status, .message, .kind, .code),
│                         before a stream or inside one
├── SwarmConnectionError  no answer: the peer cannot be reached, or a stream broke off
└── SwarmTimeoutError     the peer was reached but did not answer within timeout_s
"""

import json
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass
from typing import Literal, overload
from urllib.parse import urlsplit

import httpx

from peers.transport.auth import SwarmAuth

Deltas = Generator[str, None, None]  # a stream's text deltas; close() ends it early
AsyncDeltas = AsyncGenerator[str, None]  # the same for asyncio; aclose() ends it early

# The status of each error type a peer sends (peers/transport/errors.py gives them; the SDK does not import
# the server's errors, which load FastAPI): an error that arrives inside a stream, after the 200,
# gets the status it would have had before it. A code names its status more precisely.
STATUS_OF_TYPE = {
    "invalid_request_error": 400,
    "permission_error": 403,
    "rate_limit_error": 429,
    "server_error": 500,
    "hop_failed": 502,
    "service_unavailable": 503,
}
STATUS_OF_CODE = {"model_not_found": 404, "previous_response_not_found": 404, "not_found": 404}


class SwarmAPIError(Exception):
    def __init__(self, status: int, message: str, kind: str | None = None, code: str | None = None):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


class SwarmConnectionError(SwarmAPIError):
    def __init__(self, message: str):
        super().__init__(0, message, "connection_error")


class SwarmTimeoutError(SwarmAPIError):
    def __init__(self, message: str, timeout_s: float | None):
        super().__init__(0, message, "timeout")
        self.timeout_s = timeout_s


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0  # of the prompt tokens: those the peers' prefix caches held

    @classmethod
    def from_json(cls, data: dict) -> "Usage":
        cached = (data.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return cls(data["prompt_tokens"], data["completion_tokens"], data["total_tokens"], cached)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    model: str


def root_url(peer: str) -> str:
    """A peer's root URL (scheme://host:port) from HOST:PORT, http(s)://HOST:PORT, or OpenAI's
    base URL http(s)://HOST:PORT/v1, each with or without a trailing slash."""
    usage = "give HOST:PORT, http://HOST:PORT or http://HOST:PORT/v1"
    parts = urlsplit(peer if "://" in peer else f"http://{peer}")
    try:
        parts.port  # noqa: B018 (checks the port)
    except ValueError as e:
        raise ValueError(f"not a peer address: {peer!r} ({e}); {usage}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"not a peer address: {peer!r} (scheme {parts.scheme!r}); {usage}")
    if not parts.hostname or parts.path.rstrip("/") not in ("", "/v1") or parts.query or parts.fragment:
        raise ValueError(f"not a peer address: {peer!r}; {usage}")
    return f"{parts.scheme}://{parts.netloc}"


def _messages(messages: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


def _body(model: str, stream: bool, **params) -> dict:
    body = {"model": model, "stream": stream, **{k: v for k, v in params.items() if v is not None}}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _error(status: int, err: dict) -> SwarmAPIError:
    return SwarmAPIError(status, str(err.get("message", "")), err.get("type"), err.get("code"))


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        raise _error(r.status_code, err)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SwarmAPIError(r.status_code, r.text[:500]) from None


def _stream_error(err: dict) -> SwarmAPIError:
    """The error a peer sends inside a stream, with the status it would have answered with."""
    err = err if isinstance(err, dict) else {"message": str(err)}
    status = STATUS_OF_CODE.get(err.get("code")) or STATUS_OF_TYPE.get(err.get("type"), 500)
    return _error(status, err)


def _completion(data: dict, chat: bool) -> Completion:
    choice = data["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    return Completion(text, choice["finish_reason"], Usage.from_json(data["usage"]), data["model"])


_DONE = object()


def _parse_line(line: str, chat: bool):
    """One server-sent-events line -> the text it carries ("" for none), or _DONE at the end."""
    if not line.startswith("data: "):
        return ""
    data = line[len("data: ") :]
    if data == "[DONE]":
        return _DONE
    event = json.loads(data)
    if "error" in event:
        raise _stream_error(event["error"])
    texts = [
        (c.get("delta", {}).get("content") if chat else c.get("text")) or "" for c in event.get("choices", [])
    ]
    return "".join(texts)


class _Client:
    """What both clients hold: the HTTP client of one peer, the keys, the model. `transport`
    replaces the network (httpx.MockTransport, httpx.ASGITransport), for tests."""

    _client: type  # httpx.Client or httpx.AsyncClient

    def __init__(
        self,
        peer: str = "127.0.0.1:7001",
        model: str | None = None,
        timeout_s: float = 300.0,
        api_key: str | None = None,
        swarm_key: bytes | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self._http = self._client(
            base_url=root_url(peer), timeout=timeout_s, headers=headers, transport=transport
        )
        self._swarm_auth = SwarmAuth(swarm_key) if swarm_key else None
        self._model = model
        self._timeout_s = timeout_s

    @property
    def _table_auth(self) -> dict:
        return {"auth": self._swarm_auth} if self._swarm_auth else {}

    def _failure(self, e: httpx.HTTPError, streaming: bool = False) -> SwarmAPIError:
        """What a transport error means to the caller. `streaming`: the answer had begun."""
        url = self._http.base_url
        if isinstance(e, httpx.ReadTimeout | httpx.WriteTimeout):
            what = "sent nothing more" if streaming else "did not answer"
            return SwarmTimeoutError(
                f"{url} was reached but {what} within the timeout (timeout_s={self._timeout_s:g})",
                self._timeout_s,
            )
        if streaming:
            return SwarmConnectionError(f"stream from {url} broke: {e}")
        return SwarmConnectionError(f"cannot reach {url}: {e}")


class SwarmClient(_Client):
    """A blocking client of any peer. `model` defaults to the one the swarm serves. api_key is
    sent as 'Authorization: Bearer KEY' (a peer started with --api-key); swarm_key signs
    requests to the swarm's own paths (a private swarm's table)."""

    _client = httpx.Client

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise self._failure(e) from None
        _raise_for(r)
        return r

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.models()[0]
        return self._model

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models").json()["data"]]

    def table(self) -> dict:
        return self._request("GET", "/swarm/table", **self._table_auth).json()

    @overload
    def chat(self, messages: str | list[dict], *, stream: Literal[False] = False, **params) -> Completion: ...
    @overload
    def chat(self, messages: str | list[dict], *, stream: Literal[True], **params) -> Deltas: ...
    def chat(self, messages: str | list[dict], *, stream: bool = False, **params) -> Completion | Deltas:
        """Chat completion (messages, or one user message as a string). Parameters as OpenAI's:
        max_tokens, temperature, top_p, seed, stop. With stream=True, an iterator of text deltas."""
        body = _body(self.model, stream, messages=_messages(messages), **params)
        return self._run("/v1/chat/completions", body, stream, chat=True)

    @overload
    def complete(self, prompt: str, *, stream: Literal[False] = False, **params) -> Completion: ...
    @overload
    def complete(self, prompt: str, *, stream: Literal[True], **params) -> Deltas: ...
    def complete(self, prompt: str, *, stream: bool = False, **params) -> Completion | Deltas:
        body = _body(self.model, stream, prompt=prompt, **params)
        return self._run("/v1/completions", body, stream, chat=False)

    def _run(self, path: str, body: dict, stream: bool, chat: bool) -> Completion | Deltas:
        if not stream:
            return _completion(self._request("POST", path, json=body).json(), chat)
        return self._stream(path, body, chat)

    def _stream(self, path: str, body: dict, chat: bool) -> Deltas:
        streaming = False
        try:
            with self._http.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for(r)
                streaming = True
                for line in r.iter_lines():
                    text = _parse_line(line, chat)
                    if text is _DONE:
                        return
                    if text:
                        yield text
        except httpx.HTTPError as e:
            raise self._failure(e, streaming) from None


class AsyncSwarmClient(_Client):
    """The asyncio twin of SwarmClient: `await client.chat(...)` is a Completion, or with
    stream=True an async iterator of text deltas. A stream left early closes its response when
    it is closed (`aclose()`) or collected."""

    _client = httpx.AsyncClient

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = await self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise self._failure(e) from None
        _raise_for(r)
        return r

    async def model(self) -> str:
        if self._model is None:
            self._model = (await self.models())[0]
        return self._model

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._request("GET", "/v1/models")).json()["data"]]

    async def table(self) -> dict:
        return (await self._request("GET", "/swarm/table", **self._table_auth)).json()

    @overload
    async def chat(
        self, messages: str | list[dict], *, stream: Literal[False] = False, **params
    ) -> Completion: ...
    @overload
    async def chat(self, messages: str | list[dict], *, stream: Literal[True], **params) -> AsyncDeltas: ...
    async def chat(
        self, messages: str | list[dict], *, stream: bool = False, **params
    ) -> Completion | AsyncDeltas:
        """As SwarmClient.chat; with stream=True, an async iterator of text deltas."""
        fields = {"messages": _messages(messages), **params}
        return await self._run("/v1/chat/completions", fields, stream, chat=True)

    @overload
    async def complete(self, prompt: str, *, stream: Literal[False] = False, **params) -> Completion: ...
    @overload
    async def complete(self, prompt: str, *, stream: Literal[True], **params) -> AsyncDeltas: ...
    async def complete(self, prompt: str, *, stream: bool = False, **params) -> Completion | AsyncDeltas:
        return await self._run("/v1/completions", {"prompt": prompt, **params}, stream, chat=False)

    def stream_chat(self, messages: str | list[dict], **params) -> AsyncDeltas:
        """The text deltas of a chat completion (as `await chat(..., stream=True)`)."""
        return self._stream("/v1/chat/completions", {"messages": _messages(messages), **params}, chat=True)

    def stream_complete(self, prompt: str, **params) -> AsyncDeltas:
        return self._stream("/v1/completions", {"prompt": prompt, **params}, chat=False)

    async def _run(self, path: str, fields: dict, stream: bool, chat: bool) -> Completion | AsyncDeltas:
        model = await self.model()  # a swarm that cannot name its model fails here, not in a stream
        if stream:
            return self._stream(path, fields, chat)
        body = _body(model, False, **fields)
        return _completion((await self._request("POST", path, json=body)).json(), chat)

    async def _stream(self, path: str, fields: dict, chat: bool) -> AsyncDeltas:
        # One generator from the request to the last line: closing it (aclose, or the event
        # loop's finalizer when it is collected) closes the response, in one task.
        body = _body(await self.model(), True, **fields)
        streaming = False
        try:
            async with self._http.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _raise_for(r)
                streaming = True
                async for line in r.aiter_lines():
                    text = _parse_line(line, chat)
                    if text is _DONE:
                        return
                    if text:
                        yield text
        except httpx.HTTPError as e:
            raise self._failure(e, streaming) from None


def fetch_table(
    peer: str,
    timeout_s: float = 5.0,
    swarm_key: bytes | None = None,
    transport: httpx.BaseTransport | None = None,
) -> dict:
    with SwarmClient(
        peer, model="-", timeout_s=timeout_s, swarm_key=swarm_key, transport=transport
    ) as client:
        return client.table()


def format_table(table: dict) -> str:
    """The swarm as one peer sees it: each peer, its span, state and load; coverage and gaps."""
    rows = [
        f"swarm of {table['model']} ({table['total_layers']} layers), as seen by {table['me']} ({table['address']})",
        "",
    ]
    rows.append(f"{'peer':<21} {'address':<22} {'layers':<9} {'state':<9} {'reach':<8} {'load':>4}")
    for p in sorted(table["peers"], key=lambda p: (p["start"], p["address"])):
        span = f"{p['start']}:{p['end']}" if p["end"] > p["start"] else "-"
        reach = p.get("reach") or "unknown"  # (can others dial it? peers/swarm/reach.py)
        rows.append(
            f"{p['peer_id']:<21} {p['address']:<22} {span:<9} {p['status']:<9} {reach:<8} {p['load']:>4}"
        )
    counts = table["coverage"]
    runs, start = [], 0
    for layer in range(1, len(counts) + 1):
        if layer == len(counts) or counts[layer] != counts[start]:
            runs.append(f"{start}-{layer - 1}: x{counts[start]}")
            start = layer
    rows += ["", "coverage (serving peers per layer): " + ", ".join(runs)]
    gaps = table["gaps"]
    rows.append(
        "gaps: "
        + (", ".join(f"layers {a}-{b - 1}" for a, b in gaps) if gaps else "none; a route is complete")
    )
    return "\n".join(rows)
