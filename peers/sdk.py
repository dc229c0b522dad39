"""The Python SDK: talk to any peer of a swarm.

    from peers import SwarmClient
    client = SwarmClient("127.0.0.1:7001")
    print(client.chat("What is the capital of France?", max_tokens=32).text)
    for delta in client.chat("Tell me a story", stream=True):
        print(delta, end="")

Errors: SwarmAPIError (the swarm answered with an error; .status, .message), and its subclass
SwarmConnectionError (no answer at all).
"""

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx

from .trust import SwarmAuth


class SwarmAPIError(Exception):
    def __init__(self, status: int, message: str, kind: str | None = None):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message, self.kind = status, message, kind


class SwarmConnectionError(SwarmAPIError):
    def __init__(self, message: str):
        super().__init__(0, message, "connection_error")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    model: str


def _base_url(peer: str) -> str:
    return peer.rstrip("/") if peer.startswith(("http://", "https://")) else f"http://{peer}"


def _messages(messages: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


def _body(model: str, stream: bool, **params) -> dict:
    body = {"model": model, "stream": stream, **{k: v for k, v in params.items() if v is not None}}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        raise SwarmAPIError(r.status_code, err.get("message", ""), err.get("type"))
    except (ValueError, KeyError, TypeError):
        raise SwarmAPIError(r.status_code, r.text[:500]) from None


def _completion(data: dict, chat: bool) -> Completion:
    choice = data["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    return Completion(text, choice["finish_reason"], Usage(**data["usage"]), data["model"])


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
        raise SwarmAPIError(503, event["error"].get("message", ""), event["error"].get("type"))
    texts = [
        (c.get("delta", {}).get("content") if chat else c.get("text")) or "" for c in event.get("choices", [])
    ]
    return "".join(texts)


class _Client:
    """What both clients hold: the HTTP client of one peer, the keys, the model."""

    _client: type  # httpx.Client or httpx.AsyncClient

    def __init__(
        self,
        peer: str = "127.0.0.1:7001",
        model: str | None = None,
        timeout_s: float = 300.0,
        api_key: str | None = None,
        swarm_key: bytes | None = None,
    ):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self._http = self._client(base_url=_base_url(peer), timeout=timeout_s, headers=headers)
        self._swarm_auth = SwarmAuth(swarm_key) if swarm_key else None
        self._model = model

    @property
    def _table_auth(self) -> dict:
        return {"auth": self._swarm_auth} if self._swarm_auth else {}


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
            raise SwarmConnectionError(f"cannot reach {self._http.base_url}: {e}") from None
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

    def chat(
        self, messages: str | list[dict], *, stream: bool = False, **params
    ) -> Completion | Iterator[str]:
        """Chat completion (messages, or one user message as a string). Parameters as OpenAI's:
        max_tokens, temperature, top_p, seed, stop. With stream=True, an iterator of text deltas."""
        body = _body(self.model, stream, messages=_messages(messages), **params)
        return self._run("/v1/chat/completions", body, stream, chat=True)

    def complete(self, prompt: str, *, stream: bool = False, **params) -> Completion | Iterator[str]:
        body = _body(self.model, stream, prompt=prompt, **params)
        return self._run("/v1/completions", body, stream, chat=False)

    def _run(self, path: str, body: dict, stream: bool, chat: bool):
        if not stream:
            return _completion(self._request("POST", path, json=body).json(), chat)
        return self._stream(path, body, chat)

    def _stream(self, path: str, body: dict, chat: bool) -> Iterator[str]:
        try:
            with self._http.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for(r)
                for line in r.iter_lines():
                    text = _parse_line(line, chat)
                    if text is _DONE:
                        return
                    if text:
                        yield text
        except httpx.HTTPError as e:
            raise SwarmConnectionError(f"stream from {self._http.base_url} broke: {e}") from None


class AsyncSwarmClient(_Client):
    """The asyncio twin of SwarmClient."""

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
            raise SwarmConnectionError(f"cannot reach {self._http.base_url}: {e}") from None
        _raise_for(r)
        return r

    async def table(self) -> dict:
        return (await self._request("GET", "/swarm/table", **self._table_auth)).json()

    async def model(self) -> str:
        if self._model is None:
            self._model = (await self._request("GET", "/v1/models")).json()["data"][0]["id"]
        return self._model

    async def chat(self, messages: str | list[dict], **params) -> Completion:
        body = _body(await self.model(), False, messages=_messages(messages), **params)
        return _completion((await self._request("POST", "/v1/chat/completions", json=body)).json(), chat=True)

    async def complete(self, prompt: str, **params) -> Completion:
        body = _body(await self.model(), False, prompt=prompt, **params)
        return _completion((await self._request("POST", "/v1/completions", json=body)).json(), chat=False)

    async def stream_chat(self, messages: str | list[dict], **params) -> AsyncIterator[str]:
        body = _body(await self.model(), True, messages=_messages(messages), **params)
        async for delta in self._stream("/v1/chat/completions", body, chat=True):
            yield delta

    async def stream_complete(self, prompt: str, **params) -> AsyncIterator[str]:
        body = _body(await self.model(), True, prompt=prompt, **params)
        async for delta in self._stream("/v1/completions", body, chat=False):
            yield delta

    async def _stream(self, path: str, body: dict, chat: bool) -> AsyncIterator[str]:
        try:
            async with self._http.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _raise_for(r)
                async for line in r.aiter_lines():
                    text = _parse_line(line, chat)
                    if text is _DONE:
                        return
                    if text:
                        yield text
        except httpx.HTTPError as e:
            raise SwarmConnectionError(f"stream from {self._http.base_url} broke: {e}") from None


def fetch_table(peer: str, timeout_s: float = 5.0, swarm_key: bytes | None = None) -> dict:
    with SwarmClient(peer, model="-", timeout_s=timeout_s, swarm_key=swarm_key) as client:
        return client.table()


def format_table(table: dict) -> str:
    """The swarm as one peer sees it: each peer, its span, state and load; coverage and gaps."""
    rows = [
        f"swarm of {table['model']} ({table['total_layers']} layers), as seen by {table['me']} ({table['address']})",
        "",
    ]
    rows.append(f"{'peer':<21} {'address':<22} {'layers':<9} {'state':<9} {'load':>4}")
    for p in sorted(table["peers"], key=lambda p: (p["start"], p["address"])):
        span = f"{p['start']}:{p['end']}" if p["end"] > p["start"] else "-"
        rows.append(f"{p['peer_id']:<21} {p['address']:<22} {span:<9} {p['status']:<9} {p['load']:>4}")
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
