"""iroh (PyPI `iroh`, QUIC): a direct connection between two endpoints whose secret keys are the
peers' own Ed25519 keys (so the endpoint id IS the peer's public key), relays disabled (no iroh
relay server can run here). Message: `length (4) | payload` on one bi stream; answer 8 bytes.

usage: iroh_bench.py serve FILE BIND_ADDR [SECONDS]   (writes its id and addresses to FILE)
       iroh_bench.py dial FILE [LABEL]
"""

import asyncio
import json
import os
import statistics
import struct
import sys
import time
from pathlib import Path

import iroh
import iroh.iroh_ffi
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

ALPN = b"layerswarm/steps/0"
WINDOW = int(os.environ.get("IROH_WINDOW", "0"))  # connection receive window, bytes (0: iroh's default)
from payloads import COUNTS, payload_of  # noqa: E402  (this folder is on the path)


def identity():
    key = Ed25519PrivateKey.generate()  # as peers/swarm/identity.py keeps it
    secret = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return secret, public


async def endpoint(bind_addr=None):
    iroh.iroh_ffi.uniffi_set_event_loop(asyncio.get_running_loop())
    secret, public = identity()
    opts = iroh.EndpointOptions(
        preset=iroh.preset_minimal(),
        secret_key=secret,
        alpns=[ALPN],
        relay_mode=iroh.RelayMode.disabled(),
        **({"bind_addr": bind_addr} if bind_addr else {}),
    )
    ep = await iroh.Endpoint.bind(opts)
    assert ep.id().to_bytes() == public, "endpoint id is not the peer's Ed25519 public key"
    return ep


async def serve(file, bind_addr, seconds):
    ep = await endpoint(bind_addr)
    addr = ep.addr()
    Path(file).write_text(json.dumps({"id": str(addr.id()), "addrs": addr.direct_addresses()}))
    print("serving", addr.id().fmt_short(), addr.direct_addresses(), flush=True)

    async def handle(conn):
        bi = await conn.accept_bi()
        recv, send = bi.recv(), bi.send()
        try:
            while True:
                n = struct.unpack(">I", await recv.read_exact(4))[0]
                await recv.read_exact(n)
                await send.write_all(struct.pack(">Q", n))
        except Exception as e:
            print("stream ended:", type(e).__name__, flush=True)

    async def loop():
        while True:
            inc = await ep.accept_next()
            if inc is None:
                return
            conn = await (await inc.accept()).connect()
            if WINDOW:
                conn.set_receive_window(WINDOW)
            print("accepted from", conn.remote_id().fmt_short(), flush=True)
            asyncio.ensure_future(handle(conn))

    try:
        await asyncio.wait_for(loop(), seconds)
    except TimeoutError:
        pass
    await ep.close()


async def dial(file, label):
    ep = await endpoint()
    info = json.loads(Path(file).read_text())
    addr = iroh.EndpointAddr(iroh.EndpointId.from_string(info["id"]), None, info["addrs"])
    t0 = time.monotonic()
    conn = await asyncio.wait_for(ep.connect(addr, ALPN), 20)
    if WINDOW:
        conn.set_receive_window(WINDOW)
    bi = await conn.open_bi()
    recv, send = bi.recv(), bi.send()
    print(
        f"connected in {time.monotonic() - t0:.2f}s; paths:",
        [(p.remote_addr, p.is_relay, p.is_selected) for p in conn.paths()],
        flush=True,
    )
    for size, count in COUNTS.items():
        payload, times = payload_of(size), []
        for _ in range(count):
            t = time.perf_counter()
            await send.write_all(struct.pack(">I", size) + payload)
            assert struct.unpack(">Q", await recv.read_exact(8))[0] == size
            times.append((time.perf_counter() - t) * 1000)
        print(
            f"RESULT iroh {label} size={size} n={count} median_ms={statistics.median(times):.2f} "
            f"min_ms={min(times):.2f}",
            flush=True,
        )
    await send.finish()
    conn.close(0, b"done")
    await ep.close()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(serve(sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 120))
    else:
        asyncio.run(dial(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""))
