"""The swarm protocol's routes (/swarm/*): steps, direct-return results, progress probes, closing a
session, gossip and the table. Each answers in the protocol's own JSON; a bad message is the
sender's mistake (400, `bad_request`), and one frame's failure never fails the others."""

import asyncio
import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from peers.api.openai_routes import unless_gone
from peers.node import PeerNode
from peers.swarm.gossip import PATH_GOSSIP
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

log = logging.getLogger("layerswarm.server")
DECODE_OFF_LOOP_BYTES = 1 << 20  # a larger message is decoded in a thread, not on the event loop


class SwarmRoutes:
    """The /swarm/* handlers over one peer."""

    def __init__(self, node: PeerNode):
        self.node = node

    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route(PATH_STEPS, self.steps, methods=["POST"])
        router.add_api_route(PATH_RESULTS, self.results, methods=["POST"])
        router.add_api_route(PATH_PROGRESS, self.progress, methods=["GET"])
        router.add_api_route(PATH_CLOSE, self.close, methods=["POST"])
        router.add_api_route(PATH_GOSSIP, self.gossip, methods=["POST"])
        router.add_api_route(PATH_TABLE, self.table, methods=["GET"])
        return router

    async def steps(self, request: Request) -> Response:
        """Several steps in one message; each runs as if it came alone, one result each."""
        t0 = time.perf_counter()
        body = await request.body()
        t1 = time.perf_counter()
        try:
            if len(body) > DECODE_OFF_LOOP_BYTES:
                reqs = await asyncio.to_thread(decode_steps, body)
            else:
                reqs = decode_steps(body)
        except ProtocolError as e:
            return JSONResponse(step_error_body(str(e), None, "bad_request"), status_code=400)
        self.node.hop_times.add("read_body", t1 - t0, len(reqs))
        self.node.hop_times.add("decode", time.perf_counter() - t1, len(reqs))
        task = asyncio.ensure_future(asyncio.gather(*(self.run(r) for r in reqs)))
        if not await unless_gone(task, request, "its steps"):  # the sender gave up: so does this peer
            return Response(status_code=499)
        return JSONResponse({"results": list(task.result())})

    async def run(self, req: StepRequest) -> dict:
        """One frame of a message: its result, its acceptance (direct return) or its failure."""
        REQUEST_ID.set(req.request_id)  # (this frame's own task: its logs carry the request's id)
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

    async def results(self, body: dict) -> Response:
        """Direct return: results (or failures) of this entry's steps, from a peer of their route."""
        sender, items = body.get("from"), body.get("results")
        if not isinstance(sender, str) or not isinstance(items, list) or len(items) > MAX_STEPS_PER_MESSAGE:
            return JSONResponse(step_error_body("bad results message", None, "bad_request"), status_code=400)
        taken = 0
        for item in items:
            step_id = item.get("step_id") if isinstance(item, dict) else None
            if isinstance(step_id, str):
                taken += self.node.returns.deliver(sender, step_id, outcome_of(item, sender))
        return JSONResponse({"taken": taken})

    async def progress(self, step: str) -> dict:
        """How far a step got here (the entry asks when the step is late)."""
        return {"state": self.node.progress.state(step)}

    async def close(self, body: dict) -> dict:
        """Forget a session: its queued steps and its KV cache."""
        session_id = str(body.get("session_id"))
        self.node.scheduler.forget(session_id)
        closed = bool(self.node.block and self.node.block.close(session_id))
        return {"closed": closed}

    async def gossip(self, body: dict) -> dict:
        """One gossip exchange: the sender's news in, this peer's news out."""
        try:
            return self.node.gossip.receive(body)
        except (KeyError, TypeError, ValueError) as e:
            return JSONResponse({"error": {"message": f"bad gossip: {e}"}}, status_code=400)

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
