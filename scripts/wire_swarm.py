"""Three peers of a model in one process over httpx's in-memory transport, with every steps
message's body counted as it passes: what scripts/bench_wire.py measures the wire modes on."""

import asyncio
import struct
import time

import httpx

SPANS = ("0:10", "10:20", "20:30")


class Counting(httpx.AsyncBaseTransport):
    """An in-memory network of peers' apps that notes every steps message that crosses it:
    (body bytes, tensor bytes, positions, whether it is a prefill)."""

    def __init__(self):
        self.apps: dict[str, httpx.ASGITransport] = {}
        self.messages: list[tuple[int, int, int, bool]] = []

    async def handle_async_request(self, request):
        from peers.transport.frames import PATH_STEPS, decode_steps

        if request.url.path == PATH_STEPS:
            body = await request.aread()
            reqs = decode_steps(body)
            assert all(r.tensor.dim() == 3 for r in reqs), "only hidden states cross the wire here"
            positions = sum(r.tensor.shape[0] * r.tensor.shape[1] for r in reqs)
            prefill = any(r.tensor.shape[1] > 1 for r in reqs)
            self.messages.append((len(body), _tensor_bytes(body), positions, prefill))
        return await self.apps[f"{request.url.host}:{request.url.port}"].handle_async_request(request)


def _tensor_bytes(body: bytes) -> int:
    """The bytes of a steps message's frames that are tensor data (scales included), not headers."""
    (count,), offset, total = struct.unpack_from(">I", body), 4, 0
    for _ in range(count):
        (frame,) = struct.unpack_from(">I", body, offset)
        (header,) = struct.unpack_from(">I", body, offset + 4)
        total += frame - 4 - header
        offset += 4 + frame
    return total


async def start(model: str, wire: str):
    import torch

    from peers.config import NodeConfig
    from peers.node import PeerNode
    from peers.server import create_app
    from peers.swarm.membership import GossipSettings

    gossip = GossipSettings(interval_s=0.5, suspect_after_s=20, dead_after_s=40, tombstone_s=120)
    net = Counting()
    nodes = []
    for i, layers in enumerate(SPANS):
        config = NodeConfig(
            model=model,
            layers=layers,
            port=9100 + i,
            join=("127.0.0.1:9100",) if i else (),
            threads=torch.get_num_threads(),
            gossip=gossip,
            wire=wire,
            prefix_reuse=False,
            speculative=False,
        )
        node = PeerNode(config, http=httpx.AsyncClient(transport=net))
        net.apps[config.address] = httpx.ASGITransport(app=create_app(node))
        nodes.append(node)
    await asyncio.gather(*(n.start() for n in nodes))
    for _ in range(400):  # until every table knows (and has vouched for) every peer
        if all(len(n.table.serving(n.model_id)) == len(nodes) for n in nodes):
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError("the three peers did not find each other")
    return net, nodes


async def run_mode(model: str, wire: str, prompts: list[list[int]], long_prompt: list[int], tokens: int):
    from peers.entry.generation import generate
    from peers.transport.frames import Sampling

    net, nodes = await start(model, wire)
    entry = nodes[0]
    try:

        async def greedy(ids: list[int], n: int) -> list[int]:
            out = []
            async for step in generate(entry, ids, n, Sampling(temperature=0), frozenset()):
                out.append(step[0].token)
            return out

        await greedy(prompts[0], 2)  # warm up
        net.messages.clear()
        await greedy(long_prompt, 1)
        prefill = [m for m in net.messages if m[3]]
        net.messages.clear()
        started, runs = time.perf_counter(), []
        for ids in prompts:
            runs.append(await greedy(ids, tokens))
        seconds = time.perf_counter() - started
        decode = [m for m in net.messages if not m[3]]
    finally:
        await asyncio.gather(*(n.close() for n in nodes))
    positions = lambda ms: sum(m[2] for m in ms)  # noqa: E731
    return {
        "prefill": sum(m[0] for m in prefill) / positions(prefill),
        "prefill_tensor": sum(m[1] for m in prefill) / positions(prefill),
        "decode": sum(m[0] for m in decode) / positions(decode),
        "decode_tensor": sum(m[1] for m in decode) / positions(decode),
        "hops": (len(prefill), len(decode)),
        "runs": runs,
        "tokens_per_s": len(prompts) * tokens / seconds,
        "hidden": entry.model_config.hidden_size,
    }
