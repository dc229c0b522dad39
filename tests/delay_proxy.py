"""A TCP proxy that delivers every byte a fixed one-way delay (plus jitter) after it arrived, in
both directions, in order: WAN latency on loopback for tests and benchmarks (this kernel has no
netem). A peer behind it advertises the proxy with --public-address; real sockets, the real
code path.

    python -m tests.delay_proxy --listen 127.0.0.1:9100 --to 127.0.0.1:9000 --delay-ms 20 --jitter-ms 2
"""

import argparse
import asyncio
import random
import signal
import sys

CHUNK_BYTES = 1 << 16


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float, jitter_s: float):
    """Copy reader to writer, each chunk `delay_s` (+- jitter) after it arrived; never reorders."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await chunks.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    task = asyncio.ensure_future(deliver())
    last = 0.0
    try:
        while True:
            data = await reader.read(CHUNK_BYTES)
            last = max(last, loop.time() + delay_s + random.uniform(-jitter_s, jitter_s))
            chunks.put_nowait((last, data))
            if not data:
                break
        await task
    except (ConnectionError, OSError):
        pass
    finally:
        task.cancel()


async def serve(listen: str, target: str, delay_ms: float, jitter_ms: float) -> asyncio.Server:
    host, port = listen.rsplit(":", 1)
    to_host, to_port = target.rsplit(":", 1)
    delay_s, jitter_s = delay_ms / 1000, min(jitter_ms, delay_ms) / 1000

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        try:
            server_r, server_w = await asyncio.open_connection(to_host, int(to_port))
        except OSError:
            client_w.close()  # the target is down: the client sees its connection closed
            return
        try:
            await asyncio.gather(
                _pump(client_r, server_w, delay_s, jitter_s),
                _pump(server_r, client_w, delay_s, jitter_s),
            )
        finally:
            for w in (client_w, server_w):
                w.close()

    return await asyncio.start_server(handle, host, int(port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", required=True, help="host:port to accept connections on")
    parser.add_argument("--to", required=True, help="host:port to forward them to")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay of every byte")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform jitter around the delay")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or args.jitter_ms < 0:
        parser.error("--delay-ms and --jitter-ms must be >= 0")

    async def run():
        server = await serve(args.listen, args.to, args.delay_ms, args.jitter_ms)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
