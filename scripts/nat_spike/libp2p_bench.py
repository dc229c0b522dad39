"""py-libp2p (PyPI `libp2p`, trio): circuit relay v2 + DCUtR, Ed25519 peer ids, Noise.
Modelled on the package's own examples/nat (relay.py, listener.py, dialer.py).

usage: libp2p_bench.py relay PORT INFO_FILE [SECONDS]
       libp2p_bench.py listen RELAY_INFO_FILE INFO_FILE [SECONDS]   (no listening port reachable)
       libp2p_bench.py dial RELAY_INFO_FILE LISTENER_INFO_FILE LABEL [--direct ADDR] [--punch]
Message: `length (4) | payload` on a stream; answer 8 bytes. Prints RESULT lines.
"""

import json
import os
import statistics
import struct
import sys
import time
from pathlib import Path

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.discovery import RelayDiscovery
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID, STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

BENCH = TProtocol("/layerswarm/bench/0")
from payloads import COUNTS, payload_of  # noqa: E402  (this folder is on the path)

LIMITS = RelayLimits(duration=3600, data=1 << 30, max_circuit_conns=10, max_reservations=5)


async def read_exact(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


async def handle_bench(stream) -> None:
    try:
        while True:
            n = struct.unpack(">I", await read_exact(stream, 4))[0]
            await read_exact(stream, n)
            await stream.write(struct.pack(">Q", n))
    except Exception:
        pass


def host_with_identity():
    seed = os.urandom(32)  # a peer's Ed25519 secret, as peers/swarm/identity.py keeps it
    return new_host(key_pair=create_new_key_pair(seed))


async def run_relay(port: int, info: str, seconds: float) -> None:
    host = host_with_identity()
    protocol = CircuitV2Protocol(host, limits=LIMITS, allow_hop=True)
    async with host.run(listen_addrs=[multiaddr.Multiaddr(f"/ip4/0.0.0.0/tcp/{port}")]):
        host.set_stream_handler(PROTOCOL_ID, protocol._handle_hop_stream)
        host.set_stream_handler(STOP_PROTOCOL_ID, protocol._handle_stop_stream)
        async with background_trio_service(protocol):
            CircuitV2Transport(
                host,
                protocol,
                RelayConfig(roles=RelayRole.HOP | RelayRole.STOP | RelayRole.CLIENT, limits=LIMITS),
            )
            Path(info).write_text(json.dumps({"id": str(host.get_id()), "port": port}))
            print("relay", host.get_id(), flush=True)
            await trio.sleep(seconds)


async def client(relay_info: dict, relay_host: str, body, seconds: float) -> None:
    host = host_with_identity()
    protocol = CircuitV2Protocol(host, limits=LIMITS, allow_hop=False)
    dcutr = DCUtRProtocol(host)
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/0")]):
        host.set_stream_handler(BENCH, handle_bench)
        host.set_stream_handler(PROTOCOL_ID, protocol._handle_hop_stream)
        host.set_stream_handler(STOP_PROTOCOL_ID, protocol._handle_stop_stream)
        async with background_trio_service(protocol):
            transport = CircuitV2Transport(
                host, protocol, RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT, limits=LIMITS)
            )
            discovery = RelayDiscovery(host, auto_reserve=True)
            transport.discovery = discovery
            async with background_trio_service(discovery), background_trio_service(dcutr):
                relay_addr = f"/ip4/{relay_host}/tcp/{relay_info['port']}/p2p/{relay_info['id']}"
                relay = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
                await host.connect(relay)
                await discovery.discover_relays()  # (its periodic run had not found the relay yet)
                ok = await discovery.make_reservation(relay.peer_id)
                print("reservation at relay:", ok, flush=True)
                with trio.move_on_after(seconds):
                    await body(host, transport, dcutr, relay_addr)


async def measure(host, peer: ID, label: str) -> None:
    stream = await host.new_stream(peer, [BENCH])
    try:
        addrs = [
            str(stream.get_remote_address()),
            type(stream.muxed_conn).__name__,
            len(host.get_network().get_connections(peer)),
        ]
    except Exception as e:
        addrs = [f"? {type(e).__name__}"]
    print("stream over", addrs, flush=True)
    for size, count in COUNTS.items():
        payload, times = payload_of(size), []
        for _ in range(count):
            t = time.perf_counter()
            await stream.write(struct.pack(">I", size) + payload)
            assert struct.unpack(">Q", await read_exact(stream, 8))[0] == size
            times.append((time.perf_counter() - t) * 1000)
        print(
            f"RESULT libp2p {label} size={size} n={count} median_ms={statistics.median(times):.2f} "
            f"min_ms={min(times):.2f}",
            flush=True,
        )
    await stream.close()


def main() -> None:
    role = sys.argv[1]
    if role == "relay":
        trio.run(run_relay, int(sys.argv[2]), sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 120)
        return
    relay_info = json.loads(Path(sys.argv[2]).read_text())
    relay_host = os.environ.get("RELAY_HOST", "127.0.0.1")
    if role == "listen":

        async def body(host, transport, dcutr, relay_addr):
            Path(sys.argv[3]).write_text(json.dumps({"id": str(host.get_id())}))
            print("listener", host.get_id(), flush=True)
            await trio.sleep_forever()

        trio.run(client, relay_info, relay_host, body, float(sys.argv[4]) if len(sys.argv) > 4 else 120)
        return
    listener = ID.from_string(json.loads(Path(sys.argv[3]).read_text())["id"])
    label, punch = sys.argv[4], "--punch" in sys.argv

    async def body(host, transport, dcutr, relay_addr):
        t0 = time.monotonic()
        await transport.dial(multiaddr.Multiaddr(f"{relay_addr}/p2p-circuit/p2p/{listener}"))
        print(f"relayed connection in {time.monotonic() - t0:.2f}s", flush=True)
        await trio.sleep(1)
        await measure(host, listener, label + "-relayed")
        if punch:
            await dcutr.event_started.wait()
            ok = await dcutr.initiate_hole_punch(listener)
            print("hole punch:", ok, flush=True)
            if ok:
                await trio.sleep(1)
                await measure(host, listener, label + "-punched")

    trio.run(client, relay_info, relay_host, body, 100)


if __name__ == "__main__":
    main()
