"""Peer-to-peer streams through libp2p (peers/transport/p2p.py): two nodes on loopback, each on
its own trio thread beside this test's asyncio loop."""

import asyncio
import os

import pytest

pytest.importorskip("libp2p", reason="the p2p extra is not installed")

from peers.swarm.identity import Identity  # noqa: E402
from peers.transport.p2p import P2PNode  # noqa: E402


async def echo(body: bytes, remote: str) -> bytes:
    await asyncio.sleep(0.05 * (body[0] % 3))  # (answers come back in another order than asked)
    return body[::-1] + remote.encode()


def test_requests_share_one_stream_and_come_back_matched_by_id():
    async def main():
        a, b = P2PNode(os.urandom(32), echo), P2PNode(os.urandom(32), echo)
        await a.start()
        await b.start()
        try:
            bodies = [bytes([i]) + os.urandom(3000) for i in range(24)]
            answers = await asyncio.gather(*(a.request(b.peer_id, b.addrs, x, 10) for x in bodies))
            assert answers == [x[::-1] + a.peer_id.encode() for x in bodies]  # (b saw a's own peer id)
            assert len(a._links) == 1  # one stream to b for all of them
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_the_libp2p_peer_id_is_the_peers_own_ed25519_key():
    from cryptography.hazmat.primitives import serialization
    from libp2p.peer.id import ID

    identity = Identity.generate()

    async def main():
        node = P2PNode(identity.raw_secret(), echo)
        await node.start()
        await node.close()
        return node.peer_id

    key = ID.from_base58(asyncio.run(main())).extract_public_key().to_bytes()
    raw = identity._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key == raw


def test_a_message_over_the_receivers_limit_is_not_read_and_the_sender_is_told():
    """Fails without the limit: the receiver would read and answer a body of any size."""

    async def main():
        a, b = P2PNode(os.urandom(32), echo), P2PNode(os.urandom(32), echo, max_bytes=1000)
        await a.start()
        await b.start()
        try:
            assert await a.request(b.peer_id, b.addrs, b"\x00small", 10) == b"llams\x00" + a.peer_id.encode()
            with pytest.raises(EOFError, match="closed"):
                await a.request(b.peer_id, b.addrs, b"\x00" * 5000, 10)
            with pytest.raises(ValueError, match="bytes; the limit is 1000"):
                await b.request(a.peer_id, a.addrs, b"\x00" * 5000 + b"x" * (64 << 20), 10)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_closing_a_node_fails_what_waits_on_it():
    async def slow(body: bytes, remote: str) -> bytes:
        await asyncio.sleep(30)
        return body

    async def main():
        a, b = P2PNode(os.urandom(32), echo), P2PNode(os.urandom(32), slow)
        await a.start()
        await b.start()
        waiting = asyncio.ensure_future(a.request(b.peer_id, b.addrs, b"\x00x", 20))
        await asyncio.sleep(0.5)
        await b.close()
        with pytest.raises(EOFError):
            await asyncio.wait_for(waiting, 10)
        await a.close()

    asyncio.run(main())


def test_a_peer_reached_through_a_relay_answers_and_the_relay_sees_only_ciphertext():
    """B takes a reservation at a relaying peer R; A knows only B's relayed address there. What R
    forwards is end-to-end encrypted (Noise between A and B): no run of the hidden states' bytes."""
    import torch

    hidden = torch.randn(4, 576).numpy().tobytes()  # a decode frame's hidden states, float32
    seen: list[bytes] = []

    async def main():
        relay = P2PNode(os.urandom(32), echo, relay=True)
        a, b = P2PNode(os.urandom(32), echo), P2PNode(os.urandom(32), echo)
        for node in (relay, a, b):
            await node.start()
        forward = relay._circuits.protocol._relay_data

        async def recorded(src, dst, *args, **kwargs):  # every byte the relay reads, kept
            class Recording:
                def __getattr__(self, name):
                    return getattr(src, name)

                async def read(self, n=None):
                    data = await src.read(n)
                    seen.append(bytes(data))
                    return data

            return await forward(Recording(), dst, *args, **kwargs)

        relay._circuits.protocol._relay_data = recorded
        try:
            address = await b.reserve(relay.peer_id, relay.addrs)
            assert "/p2p-circuit/p2p/" + b.peer_id in address
            body = b"\x01" + hidden
            assert await a.request(b.peer_id, [address], body, 20) == body[::-1] + a.peer_id.encode()
            assert relay.relayed()["circuits"] >= 1
        finally:
            for node in (a, b, relay):
                await node.close()

    asyncio.run(main())
    forwarded = b"".join(seen)
    assert len(forwarded) > len(hidden)  # (the request and its answer went through the relay)
    runs = {hidden[i : i + 32] for i in range(0, len(hidden) - 32, 16)}
    assert not any(run in forwarded for run in runs)


def test_a_failed_handler_is_answered_at_once_and_nothing_waits_on_for_ever():
    """A handler's error comes back as P2PRequestFailed (not a wait for the timeout); a request
    that times out leaves nothing behind on its stream; asking a closed node is an error at once."""
    from peers.transport.p2p import P2PRequestFailed

    async def failing(body: bytes, remote: str) -> bytes:
        if body == b"slow":
            await asyncio.sleep(5)
        raise ValueError("no such step")

    async def main():
        a, b = P2PNode(os.urandom(32), echo), P2PNode(os.urandom(32), failing)
        await a.start()
        await b.start()
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(P2PRequestFailed, match="ValueError: no such step"):
                await a.request(b.peer_id, b.addrs, b"x", 20)
            assert asyncio.get_running_loop().time() - started < 5
            for _ in range(3):
                with pytest.raises(TimeoutError):
                    await a.request(b.peer_id, b.addrs, b"slow", 0.3)
            await asyncio.sleep(0.3)
            link = next(iter(a._links.values()))
            assert link.pending == {} and link.answers == {}
        finally:
            await a.close()
            await b.close()
        with pytest.raises(EOFError):
            await asyncio.wait_for(a.reserve(b.peer_id, b.addrs), 5)
        with pytest.raises(EOFError):
            await asyncio.wait_for(a.request(b.peer_id, b.addrs, b"x", 5), 5)

    asyncio.run(main())
