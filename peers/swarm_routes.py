"""The swarm protocol's routes (/swarm/*): steps, direct-return results, progress probes, closing a
session, gossip and the table. Each answers in the protocol's own JSON; a bad message is the
sender's mistake (400, `bad_request`), and one frame's failure never fails the others. A step's
sender is its remote host, vouched for where a vouched peer of the table lives there."""

import asyncio
import ipaddress
import json
import logging
import socket
import time

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from inference.kv_cache import Sender
from peers.api.openai_routes import unless_gone
from peers.hop import STEP_SENDER
from peers.node import PeerNode
from peers.swarm.gossip import PATH_GOSSIP
from peers.swarm.reach import PATH_DIALBACK
from peers.swarm.routing import coverage, gaps
from peers.transport.errors import HopFailed
from peers.transport.frames import (
    MAX_STEPS_PER_MESSAGE,
    PATH_CLOSE,
    PATH_PROGRESS,
    PATH_RESULTS,
    PATH_STEPS,
    PATH_TABLE,
    ProtocolError,
    StepRequest,
    decode_steps,
)
from peers.transport.logs import REQUEST_ID
from peers.transport.results import failure_body, outcome_of, step_error_body, step_result_body
from peers.transport.stream import PATH_STEPS_STREAM, serve_stream

log = logging.getLogger("layerswarm.server")
DECODE_OFF_LOOP_BYTES = 1 << 20  # a larger message is decoded in a thread, not on the event loop
VOUCHED_HOSTS_S = 2.0  # the hosts of vouched peers are read from the table at most this often


class SwarmRoutes:
    """The /swarm/* handlers over one peer."""

    def __init__(self, node: PeerNode):
        self.node = node
        self._vouched_hosts: frozenset[str] = frozenset()
        self._hosts_read_at = float("-inf")

    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route(PATH_STEPS, self.steps, methods=["POST"])
        router.add_api_websocket_route(PATH_STEPS_STREAM, self.steps_stream)
        router.add_api_route(PATH_RESULTS, self.results, methods=["POST"])
        router.add_api_route(PATH_PROGRESS, self.progress, methods=["GET"])
        router.add_api_route(PATH_CLOSE, self.close, methods=["POST"])
        router.add_api_route(PATH_GOSSIP, self.gossip, methods=["POST"])
        router.add_api_route(PATH_TABLE, self.table, methods=["GET"])
        router.add_api_route(PATH_DIALBACK, self.dialback, methods=["POST"])
        return router

    async def steps(self, request: Request) -> Response:
        """Several steps in one message; each runs as if it came alone, one result each."""
        t0 = time.perf_counter()
        body = await request.body()
        read_s = time.perf_counter() - t0
        peer = request.client.host if request.client else ""
        task = asyncio.ensure_future(self.message(body, peer, read_s))
        if not await unless_gone(task, request, "its steps"):  # the sender gave up: so does this peer
            return Response(status_code=499)
        status, reply = task.result()
        return JSONResponse(reply, status_code=status)

    async def steps_stream(self, ws: WebSocket) -> None:
        """The same messages over one persistent websocket (peers/transport/stream.py)."""
        handlers = {"steps": self.message, "results": self.results_message}
        await serve_stream(ws, handlers, self.node.max_steps_body_bytes)

    async def message(self, body: bytes, peer: str, read_s: float = 0.0) -> tuple[int, dict]:
        """A steps message's answer: (status, JSON) as POST /swarm/steps gives it."""
        t1 = time.perf_counter()
        try:
            if len(body) > DECODE_OFF_LOOP_BYTES:
                reqs = await asyncio.to_thread(decode_steps, body)
            else:
                reqs = decode_steps(body)
        except ProtocolError as e:
            return 400, step_error_body(str(e), None, "bad_request")
        self.node.hop_times.add("read_body", read_s, len(reqs))
        self.node.hop_times.add("decode", time.perf_counter() - t1, len(reqs))
        sender = await self.sender_of(peer)
        return 200, {"results": list(await asyncio.gather(*(self.run(r, sender) for r in reqs)))}

    async def run(self, req: StepRequest, sender: Sender) -> dict:
        """One frame of a message: its result, its acceptance (direct return) or its failure."""
        REQUEST_ID.set(req.request_id)  # (this frame's own task: its logs carry the request's id)
        STEP_SENDER.set(sender)  # (and the sessions it opens count against its sender)
        try:
            if req.reply_to is not None:  # returned directly: answered once checked and taken on
                await self.node.accept_step(req)
                return {"accepted": True}
            return step_result_body(await self.node.run_step(req))
        except HopFailed as e:
            return failure_body(e)
        except Exception as e:  # one frame's bug must not fail the others of its message
            log.exception("step failed")
            return step_error_body(f"{type(e).__name__}: {e}", self.node.peer_id, "failed")

    async def sender_of(self, peer: str) -> Sender:
        """Who sent a steps message: its remote host (a frame does not say who sent it), vouched
        for in a private swarm (every request is signed by a member) or where a vouched peer of
        this peer's table has its address."""
        host = canonical_host(peer) or peer
        if self.node.config.swarm_key is not None:
            return Sender(f"host:{host}", vouched=True)
        now = time.monotonic()
        if now - self._hosts_read_at > VOUCHED_HOSTS_S:
            self._hosts_read_at, t = now, self.node.table
            hosts = {e.address.rpartition(":")[0].strip("[]") for e in t.live() if t.vouched(e.peer_id)}
            names = {h for h in hosts if canonical_host(h) is None}
            if names:  # (a name is resolved off the event loop)
                hosts |= await asyncio.to_thread(resolved, names)
            self._vouched_hosts = frozenset(filter(None, map(canonical_host, hosts)))
        return Sender(f"host:{host}", vouched=host in self._vouched_hosts)

    async def results(self, body: dict) -> Response:
        """Direct return: results (or failures) of this entry's steps, from a peer of their route."""
        status, reply = self.take_results(body)
        return JSONResponse(reply, status_code=status)

    async def results_message(self, body: bytes, peer: str) -> tuple[int, dict]:
        """The same over a stream (peers/transport/stream.py): the body as POST /swarm/results's."""
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        return self.take_results(parsed if isinstance(parsed, dict) else {})

    def take_results(self, body: dict) -> tuple[int, dict]:
        sender, items = body.get("from"), body.get("results")
        if not isinstance(sender, str) or not isinstance(items, list) or len(items) > MAX_STEPS_PER_MESSAGE:
            return 400, step_error_body("bad results message", None, "bad_request")
        taken = 0
        for item in items:
            step_id = item.get("step_id") if isinstance(item, dict) else None
            if isinstance(step_id, str):
                taken += self.node.returns.deliver(sender, step_id, outcome_of(item, sender))
        return 200, {"taken": taken}

    async def progress(self, step: str) -> dict:
        """How far a step got here (the entry asks when the step is late)."""
        return {"state": self.node.progress.state(step)}

    async def close(self, body: dict) -> dict:
        """Forget a session: its queued steps and its KV cache."""
        session_id = str(body.get("session_id"))
        self.node.scheduler.forget(session_id)
        closed = bool(self.node.block and self.node.block.close(session_id))
        return {"closed": closed}

    async def gossip(self, body: dict, request: Request) -> dict:
        """One gossip exchange: the sender's news in (what it may add counted against its host),
        this peer's news out."""
        try:
            host = request.client.host if request.client else ""
            return self.node.gossip.receive(body, canonical_host(host) or host)
        except (KeyError, TypeError, ValueError) as e:
            return JSONResponse({"error": {"message": f"bad gossip: {e}"}}, status_code=400)

    async def dialback(self, request: Request) -> JSONResponse:
        """Dial the asking host back at the port it names (peers/swarm/reach.py)."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        host = request.client.host if request.client else ""
        status, reply = await self.node.reach.answer(body, canonical_host(host) or host)
        return JSONResponse(reply, status_code=status)

    async def table(self) -> dict:
        """This peer's table of the swarm, with the layers' coverage and its gaps."""
        node, t = self.node, self.node.table
        peers = [
            {**e.to_json(), "status": t.status(e.peer_id), "vouched": t.vouched(e.peer_id)} for e in t.known()
        ]
        counts = coverage(t.serving(node.model_id), node.total_layers)
        return {
            "me": node.peer_id,
            "address": t.me.address,
            "model": node.model_id,
            "total_layers": node.total_layers,
            "peers": peers,
            "coverage": counts,
            "gaps": gaps(counts),
            "declared_dead": [list(d) for d in t.deaths],
        }


def canonical_host(host: str) -> str | None:
    """An IP address as one spelling (an IPv4-mapped IPv6 address as IPv4); None for a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def resolved(names: set[str]) -> set[str]:
    """The addresses the host names resolve to (those that do not resolve are left out)."""
    out: set[str] = set()
    for name in names:
        try:
            out |= {info[4][0] for info in socket.getaddrinfo(name, None)}
        except OSError:
            continue
    return out
