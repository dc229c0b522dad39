"""aiortc data channel across NAT: ICE (STUN hole punching, TURN relaying by coturn), DTLS.

Signalling goes through files in a shared folder (the namespaces share the file system); in the
project it would go through the seed's / peers' existing HTTP. Each side signs its SDP (which
carries its DTLS certificate fingerprint) with its own Ed25519 key, and checks the other's
signature against the public key it expects: DTLS then refuses any certificate whose fingerprint
differs, so a TURN relay (or anyone between) cannot read or change the traffic.

usage: aiortc_bench.py answer|offer DIR [--stun URL] [--turn URL] [--relay-only] [--sizes 3072,2097152]
A message is `length (4 bytes) | payload` cut into CHUNK-byte data channel messages; the answer
to each is 8 bytes. The offerer prints medians of round trips.
"""

import argparse
import asyncio
import base64
import json
import os
import statistics
import struct
import sys
import time
from pathlib import Path

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

CHUNK = 60000  # below aiortc's advertised max-message-size (65536 by default, 262144 between aiortc peers)
from payloads import COUNTS, payload_of  # noqa: E402  (this folder is on the path)


def key_for(role: str, folder: Path) -> Ed25519PrivateKey:
    """Each role's identity (the project's peers have Ed25519 identities)."""
    path = folder / f"{role}.key"
    if not path.exists():
        path.write_bytes(os.urandom(32))
    return Ed25519PrivateKey.from_private_bytes(path.read_bytes())


def pub_of(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def signed(desc, key) -> str:
    body = json.dumps({"sdp": desc.sdp, "type": desc.type})
    sig = key.sign(body.encode())
    return json.dumps({"body": body, "sig": base64.b64encode(sig).decode()})


def checked(text: str, public: bytes) -> RTCSessionDescription:
    msg = json.loads(text)
    Ed25519PublicKey.from_public_bytes(public).verify(base64.b64decode(msg["sig"]), msg["body"].encode())
    body = json.loads(msg["body"])
    return RTCSessionDescription(sdp=body["sdp"], type=body["type"])


async def wait_file(path: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {timeout_s}s")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.05)
    return path.read_text()


def config(args) -> RTCConfiguration:
    servers = []
    if args.stun:
        servers.append(RTCIceServer(urls=args.stun))
    if args.turn:
        servers.append(RTCIceServer(urls=args.turn, username="ls", credential="ls"))
    policy = RTCIceTransportPolicy.RELAY if args.relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


def path_kind(pc) -> str:
    """The selected ICE pair's candidate types (host / srflx / prflx / relay)."""
    conn = pc.sctp.transport.transport._connection  # aioice.Connection
    pair = next(iter(conn._nominated.values()))
    return f"{pair.local_candidate.type}->{pair.remote_candidate.type} {pair.remote_candidate.host}:{pair.remote_candidate.port}"


def receiver(channel):
    """Reassembles `length | payload` messages cut into chunks; acks each with 8 bytes."""
    state = {"need": None, "got": 0}

    @channel.on("message")
    def on_message(data):
        if state["need"] is None:
            state["need"] = struct.unpack(">I", data[:4])[0]
            data = data[4:]
        state["got"] += len(data)
        if state["got"] >= state["need"]:
            channel.send(struct.pack(">Q", state["got"]))
            state["need"], state["got"] = None, 0


async def answer(args, folder: Path) -> None:
    me, other = key_for("answer", folder), pub_of(key_for("offer", folder))
    pc = RTCPeerConnection(config(args))
    done = asyncio.Event()
    pc.on("datachannel", receiver)
    pc.on("connectionstatechange", lambda: pc.connectionState in ("closed", "failed") and done.set())
    offer = checked(await wait_file(folder / "offer.json", 30), other)
    await pc.setRemoteDescription(offer)
    await pc.setLocalDescription(await pc.createAnswer())
    (folder / "answer.json").write_text(signed(pc.localDescription, me))
    try:
        await asyncio.wait_for(done.wait(), args.serve_s)
    except TimeoutError:
        pass
    await pc.close()


async def offer(args, folder: Path) -> None:
    me, other = key_for("offer", folder), pub_of(key_for("answer", folder))
    pc = RTCPeerConnection(config(args))
    channel = pc.createDataChannel("steps")
    opened, replies = asyncio.Event(), asyncio.Queue()
    channel.on("open", opened.set)
    channel.on("message", replies.put_nowait)
    t0 = time.monotonic()
    await pc.setLocalDescription(await pc.createOffer())
    (folder / "offer.json").write_text(signed(pc.localDescription, me))
    await pc.setRemoteDescription(checked(await wait_file(folder / "answer.json", 30), other))
    await asyncio.wait_for(opened.wait(), 30)
    print(f"connected in {time.monotonic() - t0:.2f}s via {path_kind(pc)}", flush=True)
    for size in args.sizes:
        payload = payload_of(size)
        times = []
        for _ in range(COUNTS.get(size, 20)):
            t = time.perf_counter()
            data = struct.pack(">I", size) + payload
            for i in range(0, len(data), CHUNK):
                channel.send(data[i : i + CHUNK])
            got = struct.unpack(">Q", await asyncio.wait_for(replies.get(), 30))[0]
            assert got == size, got
            times.append((time.perf_counter() - t) * 1000)
        print(
            f"RESULT aiortc {args.label} size={size} n={len(times)} median_ms={statistics.median(times):.2f} "
            f"min_ms={min(times):.2f}",
            flush=True,
        )
    await pc.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["answer", "offer"])
    p.add_argument("folder")
    p.add_argument("--stun")
    p.add_argument("--turn")
    p.add_argument("--relay-only", action="store_true")
    p.add_argument("--label", default="")
    p.add_argument("--serve-s", type=float, default=120)
    p.add_argument("--sizes", default="3072,2097152")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    asyncio.run(answer(args, folder) if args.role == "answer" else offer(args, folder))


if __name__ == "__main__":
    sys.exit(main())
