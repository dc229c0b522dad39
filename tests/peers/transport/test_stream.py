"""The lean hop (peers/transport/stream.py): steps messages over one persistent websocket per next
peer. Real peers on loopback: a swarm's steps go over streams and its greedy text is the
monolithic model's; `--no-hop-stream` sends them by HTTP; a next peer that takes no stream gets
them by HTTP; a malformed message closes the stream without any work; the framing round-trips."""

import asyncio

import httpx
import pytest
from transformers import AutoTokenizer

from peers.transport.stream import PATH_STEPS_STREAM, Streams
from peers.transport.stream_format import (
    StreamFormatError,
    parse_stream_answer,
    parse_stream_message,
    stream_answer,
    stream_message,
)
from tests.helpers import greedy_reference, monolithic
from tests.peers.processes import free_port, tiny_route

pytestmark = pytest.mark.processes


def test_the_framing_round_trips_and_refuses_what_is_not_a_message():
    data = stream_message(7, {"x-swarm-time": "1"}, b"body")
    assert parse_stream_message(data) == (7, {"x-swarm-time": "1"}, b"body")
    assert parse_stream_answer(stream_answer(9, 429, {"a": 1})) == (9, 429, b'{"a": 1}')
    for bad in (
        b"",
        b"\x00" * 11,
        data[:12] + b"\xff" * 8,
        stream_message(1, {}, b"")[:8] + b"\x00\x00\xff\xff",
    ):
        with pytest.raises(StreamFormatError):
            parse_stream_message(bad)
    with pytest.raises(StreamFormatError):
        parse_stream_message(stream_message(1, {"n": 1}, b""))  # (header values are strings)


def test_no_stream_where_nothing_takes_one():
    async def main():
        streams = Streams(None, 1 << 20)
        out = await streams.post(f"127.0.0.1:{free_port()}", b"x", 5.0)
        again = await streams.post(f"127.0.0.1:{free_port()}", b"x", 5.0)
        return out, again, streams.to_json()

    out, again, stats = asyncio.run(main())
    assert out is None and again is None and stats["http_fallbacks"] == 2 and stats["messages"] == 0


def completion(peer, prompt: str, n: int = 8) -> str:
    body = {"model": "llama", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{peer.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("stream", [True, False])
def test_steps_go_over_streams_and_the_text_is_the_models(tiny_llama, tmp_path, stream):
    tok, model = AutoTokenizer.from_pretrained(tiny_llama), monolithic(tiny_llama)
    args = [] if stream else ["--no-hop-stream"]
    with tiny_route(tiny_llama, tmp_path, args) as swarm:
        entry = swarm.peers[0]
        for prompt in ("hello there", "the stream is"):
            want = tok.decode(greedy_reference(model, tok.encode(prompt), 8), skip_special_tokens=True)
            assert completion(entry, prompt) == want
        forwarded = [p.health()["forwarded"] for p in swarm.peers]
    if stream:
        assert forwarded[0]["streams"]["messages"] > 0 and forwarded[0]["streams"]["open"] >= 1
        assert forwarded[0]["streams"]["http_fallbacks"] == 0
        # the last peer returns the results to the entry over a stream of its own
        assert forwarded[-1]["streams"]["results_messages"] > 0, forwarded[-1]
        assert forwarded[-1]["streams"]["http_fallbacks"] == 0
    else:
        assert all("streams" not in f for f in forwarded) and forwarded[0]["messages"] > 0


def test_a_stream_outlives_the_header_timeout(tiny_llama, tmp_path):
    """uvicorn's connection (whose header timer closes idle connections) becomes the stream's:
    its timer must not close the stream once the handshake came in time."""
    import time

    with tiny_route(tiny_llama, tmp_path, ["--header-timeout", "1"]) as swarm:
        entry = swarm.peers[0]
        first = completion(entry, "hello there")
        time.sleep(2.5)
        assert completion(entry, "hello there") == first
        streams = entry.health()["forwarded"]["streams"]
    assert streams["connects"] == 1 and streams["open"] == 1, streams


def test_a_malformed_message_closes_the_stream_without_work(tiny_llama, tmp_path):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    with tiny_route(tiny_llama, tmp_path) as swarm:
        peer = swarm.peers[1]
        before = peer.health()["steps_served"]

        async def main():
            async with connect(f"ws://{peer.address}{PATH_STEPS_STREAM}", proxy=None) as ws:
                answers = []
                await ws.send(stream_message(1, {}, b"not a steps message"))
                _, status, reply = parse_stream_answer(await ws.recv())  # a bad body: 400, stream stays
                answers.append(status)
                await ws.send(stream_message(2, {"kind": "results"}, b"[]"))  # not a results message: 400
                answers.append(parse_stream_answer(await ws.recv())[1])
                await ws.send(b"\x00\x01")  # not a stream message at all: the stream closes
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
            async with connect(f"ws://{peer.address}{PATH_STEPS_STREAM}", proxy=None) as ws:
                await ws.send(stream_message(3, {"kind": "gossip"}, b"{}"))  # a kind it takes none of
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
            return answers

        assert asyncio.run(main()) == [400, 400]
        assert peer.health()["steps_served"] == before


def test_an_idle_stream_is_closed(tiny_llama, make_swarm):
    """A stream that carries nothing holds one of the peer's connections: it is closed after
    IDLE_S (1 s here) without a message, and a sender opens it again when it needs it."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    swarm = make_swarm(tiny_llama)
    peer = swarm.add("0:4", patch="import peers.transport.stream as stream\nstream.IDLE_S = 1.0")
    swarm.wait_ready()

    async def main():
        async with connect(f"ws://{peer.address}{PATH_STEPS_STREAM}", proxy=None) as ws:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)

    asyncio.run(main())
