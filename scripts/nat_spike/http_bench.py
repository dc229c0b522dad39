"""Baselines: the project's own transports on a direct path. HTTP POST (httpx -> uvicorn) and a
websocket (websockets -> uvicorn, as peers/transport/stream.py). Message of N bytes out, 8 bytes back.

usage: http_bench.py serve HOST PORT [SECONDS]
       http_bench.py http|ws HOST PORT [LABEL]
Runs in the project's venv (uvicorn, httpx, websockets are its dependencies).
"""

import asyncio
import statistics
import struct
import sys
import time

from payloads import COUNTS, payload_of  # noqa: E402  (this folder is on the path)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            msg = await receive()
            if msg["type"] != "websocket.receive":
                return
            data = msg.get("bytes") or b""
            await send({"type": "websocket.send", "bytes": struct.pack(">Q", len(data))})
    n, more = 0, True
    while more:
        msg = await receive()
        n += len(msg.get("body", b""))
        more = msg.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/octet-stream")],
        }
    )
    await send({"type": "http.response.body", "body": struct.pack(">Q", n)})


def report(kind, label, size, times):
    print(
        f"RESULT {kind} {label} size={size} n={len(times)} median_ms={statistics.median(times):.2f} "
        f"min_ms={min(times):.2f}",
        flush=True,
    )


async def http_client(host, port, label):
    import httpx

    async with httpx.AsyncClient(timeout=30) as c:
        await c.post(f"http://{host}:{port}/x", content=b"warm")
        for size, count in COUNTS.items():
            payload, times = payload_of(size), []
            for _ in range(count):
                t = time.perf_counter()
                r = await c.post(f"http://{host}:{port}/x", content=payload)
                assert struct.unpack(">Q", r.content)[0] == size
                times.append((time.perf_counter() - t) * 1000)
            report("http", label, size, times)


async def ws_client(host, port, label):
    from websockets.asyncio.client import connect

    async with connect(f"ws://{host}:{port}/s", max_size=None, compression=None, proxy=None) as ws:
        for size, count in COUNTS.items():
            payload, times = payload_of(size), []
            for _ in range(count):
                t = time.perf_counter()
                await ws.send(payload)
                assert struct.unpack(">Q", await ws.recv())[0] == size
                times.append((time.perf_counter() - t) * 1000)
            report("websocket", label, size, times)


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "serve":
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", ws_max_size=64 << 20)
        server = uvicorn.Server(config)

        async def run():
            task = asyncio.create_task(server.serve())
            await asyncio.sleep(float(sys.argv[4]) if len(sys.argv) > 4 else 120)
            server.should_exit = True
            await task

        asyncio.run(run())
    else:
        label = sys.argv[4] if len(sys.argv) > 4 else ""
        asyncio.run((http_client if mode == "http" else ws_client)(host, port, label))


if __name__ == "__main__":
    main()
