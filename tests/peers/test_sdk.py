"""The Python SDK without model peers: base URLs, async streams (and leaving them early), errors
inside a stream, timeouts. httpx.MockTransport stands for a peer; one test streams from a real
HTTP server in the test's own event loop."""

import asyncio
import gc
import json
import socket

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from peers import AsyncSwarmClient, SwarmAPIError, SwarmClient, SwarmConnectionError, SwarmTimeoutError
from peers.entry.generation import NoRoom
from peers.sdk import STATUS_OF_CODE, STATUS_OF_TYPE, fetch_table, root_url
from peers.transport import errors as server_errors

MODEL = "tiny"
TABLE = {"model": MODEL, "peers": []}


def sse(*events: dict | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def chat_chunk(text: str) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


def text_chunk(text: str) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text}]}


class Peer:
    """A peer's OpenAI API as a MockTransport handler: streams `deltas`, then `tail` events."""

    def __init__(self, deltas=("Hel", "lo"), tail=("[DONE]",)):
        self.deltas, self.tail, self.requests = deltas, tail, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL}]})
        if request.url.path == "/swarm/table":
            return httpx.Response(200, json=TABLE)
        body = json.loads(request.content)
        chat = request.url.path == "/v1/chat/completions"
        if not body["stream"]:
            choice = (
                {"message": {"content": "".join(self.deltas)}} if chat else {"text": "".join(self.deltas)}
            )
            usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
            return httpx.Response(
                200, json={"model": MODEL, "choices": [{**choice, "finish_reason": "stop"}], "usage": usage}
            )
        chunks = [chat_chunk(d) if chat else text_chunk(d) for d in self.deltas]
        return httpx.Response(
            200, content=sse(*chunks, *self.tail), headers={"content-type": "text/event-stream"}
        )


FORMS = [
    "127.0.0.1:7001",
    "http://127.0.0.1:7001",
    "http://127.0.0.1:7001/",
    "http://127.0.0.1:7001/v1",
    "http://127.0.0.1:7001/v1/",
]


@pytest.mark.parametrize("peer", FORMS)
def test_root_url_takes_an_address_or_a_base_url(peer):
    assert root_url(peer) == "http://127.0.0.1:7001"


def test_root_url_keeps_https_and_names():
    assert root_url("https://swarm.example.com/v1") == "https://swarm.example.com"
    assert root_url("[::1]:7001") == "http://[::1]:7001"


@pytest.mark.parametrize(
    "peer",
    [
        "http://127.0.0.1:7001/v2",
        "ftp://127.0.0.1:7001",
        "127.0.0.1:port",
        "http://h:1/v1?x=1",
        "",
        "http://:7001",
    ],
)
def test_root_url_names_a_bad_value(peer):
    with pytest.raises(ValueError, match="not a peer address") as caught:
        root_url(peer)
    assert repr(peer) in str(caught.value)


@pytest.mark.parametrize("peer", FORMS)
def test_every_client_takes_every_form(peer):
    server = Peer()
    with SwarmClient(peer, transport=httpx.MockTransport(server)) as client:
        assert client.models() == [MODEL]
    assert fetch_table(peer, transport=httpx.MockTransport(server)) == TABLE

    async def run():
        async with AsyncSwarmClient(peer, transport=httpx.MockTransport(server)) as client:
            return await client.model()

    assert asyncio.run(run()) == MODEL
    assert [str(r.url) for r in server.requests] == [
        "http://127.0.0.1:7001/v1/models",
        "http://127.0.0.1:7001/swarm/table",
        "http://127.0.0.1:7001/v1/models",
    ]


def test_clients_refuse_a_bad_url():
    for make in (SwarmClient, AsyncSwarmClient):
        with pytest.raises(ValueError, match="'http://127.0.0.1:7001/openai'"):
            make("http://127.0.0.1:7001/openai")
    with pytest.raises(ValueError, match="'gopher://x:1'"):
        fetch_table("gopher://x:1")


def test_sync_chat_and_stream():
    server = Peer()
    with SwarmClient(transport=httpx.MockTransport(server)) as client:
        assert client.chat("hi").text == "Hello"
        assert list(client.chat("hi", stream=True)) == ["Hel", "lo"]
        assert list(client.complete("hi", stream=True)) == ["Hel", "lo"]
    sent = json.loads(server.requests[-1].content)
    assert sent["stream"] and sent["stream_options"] == {"include_usage": True} and sent["model"] == MODEL


def test_async_chat_and_complete_stream_like_the_sync_client():
    server = Peer()

    async def run():
        async with AsyncSwarmClient(transport=httpx.MockTransport(server)) as client:
            whole = await client.chat("hi")
            chat = [d async for d in await client.chat("hi", stream=True)]
            text = [d async for d in await client.complete("hi", stream=True)]
            old_chat = [d async for d in client.stream_chat([{"role": "user", "content": "hi"}])]
            old_text = [d async for d in client.stream_complete("hi")]
            return whole.text, chat, text, old_chat, old_text

    assert asyncio.run(run()) == ("Hello", ["Hel", "lo"], ["Hel", "lo"], ["Hel", "lo"], ["Hel", "lo"])
    paths = [r.url.path for r in server.requests if r.method == "POST"]
    assert paths == ["/v1/chat/completions", "/v1/chat/completions", "/v1/completions"] + [
        "/v1/chat/completions",
        "/v1/completions",
    ]


def test_async_stream_answers_an_error_status_as_it_starts():
    def refuse(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": MODEL}]})
        return httpx.Response(429, json=server_errors.Overloaded("busy").to_json())

    async def run():
        async with AsyncSwarmClient(transport=httpx.MockTransport(refuse)) as client:
            stream = await client.chat("hi", stream=True)
            with pytest.raises(SwarmAPIError) as caught:
                await anext(stream)
            return caught.value

    error = asyncio.run(run())
    assert (error.status, error.kind, error.code, error.message) == (
        429,
        "rate_limit_error",
        "overloaded",
        "busy",
    )


# Every error a peer can send inside a stream, once each (a new SwarmError class must be added).
IN_BAND = [
    server_errors.SwarmError("internal error: boom"),
    server_errors.InvalidRequest("bad stop"),
    server_errors.Forbidden("not yours"),
    server_errors.ModelNotServed("gpt-9", MODEL),
    server_errors.Overloaded("no room"),
    NoRoom("no route had room before the first token"),
    server_errors.SwarmUnavailable("no peer serves layers 1-2"),
    server_errors.HopFailed("peer-b", "refused"),
    server_errors.NotFound("no response 'resp_1' is kept here", code="previous_response_not_found"),
]


def test_in_band_errors_cover_every_server_error():
    def tree(cls):
        return {cls}.union(*(tree(sub) for sub in cls.__subclasses__()))

    assert {type(e) for e in IN_BAND} == tree(server_errors.SwarmError)
    assert set(STATUS_OF_TYPE) == {e.kind for e in IN_BAND}


@pytest.mark.parametrize("error", IN_BAND, ids=lambda e: type(e).__name__)
def test_an_error_inside_a_stream_keeps_its_type_and_status(error):
    server = Peer(deltas=("Hel",), tail=(error.to_json(), "[DONE]"))
    with SwarmClient(transport=httpx.MockTransport(server)) as client:
        got, stream = [], client.chat("hi", stream=True)
        with pytest.raises(SwarmAPIError) as caught:
            got.extend(stream)
    assert got == ["Hel"]
    e = caught.value
    assert (e.status, e.kind, e.code, e.message) == (error.status, error.kind, error.code, error.message)
    assert e.status == STATUS_OF_CODE.get(error.code, STATUS_OF_TYPE[error.kind])

    async def run():
        async with AsyncSwarmClient(transport=httpx.MockTransport(server)) as client:
            with pytest.raises(SwarmAPIError) as caught:
                [d async for d in await client.complete("hi", stream=True)]
            return caught.value

    e = asyncio.run(run())
    assert (e.status, e.kind, e.code) == (error.status, error.kind, error.code)


def test_an_unknown_error_type_inside_a_stream_is_kept():
    server = Peer(tail=({"error": {"message": "odd", "type": "brand_new", "code": None}}, "[DONE]"))
    with SwarmClient(transport=httpx.MockTransport(server)) as client, pytest.raises(SwarmAPIError) as caught:
        list(client.chat("hi", stream=True))
    assert (caught.value.status, caught.value.kind, caught.value.message) == (500, "brand_new", "odd")


def failing(error: type[httpx.HTTPError]):
    """A transport that fails every request but /v1/models with `error`."""

    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": MODEL}]})
        raise error("it failed", request=request)

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("stream", [False, True])
def test_a_read_timeout_is_not_a_connection_error(stream):
    with (
        SwarmClient(timeout_s=2.5, transport=failing(httpx.ReadTimeout)) as client,
        pytest.raises(SwarmTimeoutError) as caught,
    ):
        done = client.chat("hi", stream=stream)
        if stream:
            list(done)
    message = str(caught.value)
    assert "was reached but did not answer" in message and "timeout_s=2.5" in message
    assert "cannot reach" not in message and not isinstance(caught.value, SwarmConnectionError)
    assert (caught.value.kind, caught.value.timeout_s) == ("timeout", 2.5)

    async def run():
        async with AsyncSwarmClient(timeout_s=2.5, transport=failing(httpx.ReadTimeout)) as client:
            with pytest.raises(SwarmTimeoutError, match="timeout_s=2.5"):
                done = await client.chat("hi", stream=stream)
                if stream:
                    [d async for d in done]

    asyncio.run(run())


@pytest.mark.parametrize("error", [httpx.ConnectTimeout, httpx.ConnectError])
def test_a_connect_failure_says_cannot_reach(error):
    with SwarmClient("127.0.0.1:9", transport=failing(error)) as client:
        with pytest.raises(SwarmConnectionError, match="cannot reach http://127.0.0.1:9"):
            client.complete("hi")
        with pytest.raises(SwarmConnectionError, match="cannot reach http://127.0.0.1:9"):
            list(client.complete("hi", stream=True))


class Stalls(httpx.AsyncByteStream, httpx.SyncByteStream):
    """A stream body: one delta, then a read timeout."""

    def __init__(self, request):
        self.request = request

    def __iter__(self):
        yield sse(chat_chunk("Hel"))
        raise httpx.ReadTimeout("no data", request=self.request)

    async def __aiter__(self):
        yield sse(chat_chunk("Hel"))
        raise httpx.ReadTimeout("no data", request=self.request)


def test_a_stream_that_stalls_is_a_timeout():
    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": MODEL}]})
        return httpx.Response(200, stream=Stalls(request))

    got = []
    stalled = r"was reached but sent nothing more within the timeout \(timeout_s=3\)"
    with SwarmClient(timeout_s=3, transport=httpx.MockTransport(handler)) as client:
        stream = client.chat("hi", stream=True)
        with pytest.raises(SwarmTimeoutError, match=stalled):
            got.extend(stream)
    assert got == ["Hel"]


class Endless(httpx.AsyncByteStream):
    """A stream body that never ends; it records being closed."""

    def __init__(self):
        self.closed = asyncio.Event()
        self.sent = 0

    async def __aiter__(self):
        while True:
            self.sent += 1
            yield sse(chat_chunk(f"{self.sent} "))
            await asyncio.sleep(0)

    async def aclose(self):
        self.closed.set()


def quiet_loop_errors() -> list[dict]:
    """The running loop's unhandled errors ("Task exception was never retrieved", ...)."""
    seen = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: seen.append(context))
    return seen


@pytest.mark.parametrize("leave", ["aclose", "collect"])
def test_leaving_an_async_stream_closes_its_response(leave):
    async def run():
        seen = quiet_loop_errors()
        bodies = []

        def handler(request):
            if request.url.path == "/v1/models":
                return httpx.Response(200, json={"data": [{"id": MODEL}]})
            bodies.append(Endless())
            return httpx.Response(200, stream=bodies[-1])

        async with AsyncSwarmClient(transport=httpx.MockTransport(handler)) as client:
            stream = await client.chat("hi", stream=True)
            async for delta in stream:
                assert delta == "1 "
                break
            assert not bodies[0].closed.is_set()
            if leave == "aclose":
                await stream.aclose()
            else:
                del stream
                gc.collect()
            await asyncio.wait_for(bodies[0].closed.wait(), 5)
            # the client still works afterwards
            old = client.stream_chat("hi")
            assert await anext(old) == "1 "
            await old.aclose()
            await asyncio.wait_for(bodies[1].closed.wait(), 5)
        return seen

    assert asyncio.run(run()) == []


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def test_leaving_a_stream_of_a_real_server_disconnects_it():
    """Over a real connection: the server sees the client go, and nothing warns."""

    async def run():
        seen = quiet_loop_errors()
        ended = asyncio.Event()

        async def endless():
            try:
                n = 0
                while True:
                    n += 1
                    yield sse(chat_chunk(f"{n} "))
                    await asyncio.sleep(0.01)
            finally:
                ended.set()

        async def models(_):
            return StreamingResponse(
                iter([json.dumps({"data": [{"id": MODEL}]})]), media_type="application/json"
            )

        async def chat(_):
            return StreamingResponse(endless(), media_type="text/event-stream")

        app = Starlette(
            routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
        )
        sock = free_socket()
        server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                await asyncio.sleep(0.01)
            async with AsyncSwarmClient(f"http://127.0.0.1:{sock.getsockname()[1]}/v1") as client:
                stream = await client.chat("hi", stream=True)
                async for delta in stream:
                    assert delta == "1 "
                    break
                del stream
                gc.collect()
                await asyncio.wait_for(ended.wait(), 5)
        finally:
            server.should_exit = True
            await serving
            sock.close()
        return seen

    assert asyncio.run(run()) == []
