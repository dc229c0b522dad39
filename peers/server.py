"""The peer's HTTP server: health, the swarm protocol (step, close, gossip, table) and the
OpenAI-compatible API, all on one port."""

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from peers.api.openai_routes import router as openai_router
from peers.api.openai_routes import unless_gone
from peers.api.service_routes import router as service_router
from peers.metrics import HTTPMetrics
from peers.node import PeerNode
from peers.swarm.gossip import PATH_GOSSIP
from peers.swarm.routing import coverage, gaps
from peers.transport.auth import Guard
from peers.transport.errors import Forbidden, HopFailed, InvalidRequest, SwarmError, install_handlers
from peers.transport.forwarder import outcome_of
from peers.transport.frames import (
    MAX_STEPS_PER_MESSAGE,
    PATH_CLOSE,
    PATH_HEALTH,
    PATH_METRICS,
    PATH_PROGRESS,
    PATH_RESULTS,
    PATH_STEPS,
    PATH_TABLE,
    PATH_VIEW,
    ProtocolError,
    decode_steps,
    step_error_body,
    step_result_body,
)
from peers.transport.limits import BodyLimits
from peers.transport.logs import REQUEST_ID, REQUEST_ID_HEADER, RequestIds
from peers.view import PAGE, View, loopback

log = logging.getLogger("layerswarm.server")


def create_app(node: PeerNode, on_start_failure=None) -> FastAPI:
    """The peer's app; `on_start_failure(exc)` is called if joining or loading fails."""

    def started(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the peer failed to start: %s", task.exception())
            if on_start_failure is not None:
                on_start_failure(task.exception())

    node.on_fatal = on_start_failure

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = asyncio.create_task(node.start())
        starting.add_done_callback(started)
        try:
            yield
        finally:
            starting.cancel()
            await node.leave()
            await node.close()

    app = FastAPI(title="LayerSwarm peer", lifespan=lifespan)
    install_handlers(app)
    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(Guard, swarm_key=node.config.swarm_key, api_keys=node.config.api_keys)
    app.add_middleware(  # outermost: caps what Guard reads too
        BodyLimits,
        cap_for=lambda path: node.max_steps_body_bytes if path == PATH_STEPS else node.config.max_body_bytes,
        read_timeout_s=node.config.read_timeout_s,
    )
    app.include_router(openai_router(node))
    app.include_router(service_router(node))
    # outside Guard and the limits: the requests they refuse are logged and counted too
    app.add_middleware(RequestIds)
    if node.config.allowed_origins:  # outside Guard: a preflight carries no API key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(node.config.allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER],
        )
    app.add_middleware(HTTPMetrics, metrics=node.metrics)

    view = View(node)

    @app.get("/")
    async def page() -> Response:
        """The swarm page (peers/page.html): it draws GET /view once a second."""
        return Response(PAGE, media_type="text/html; charset=utf-8")

    @app.get(PATH_VIEW)
    async def view_data(request: Request) -> Response:
        if node.config.swarm_key is not None and not loopback(
            request.client.host if request.client else None
        ):
            raise Forbidden(
                "this is a private swarm: its page answers on loopback only", code="loopback_only"
            )
        return JSONResponse(await view.snapshot())

    @app.get(PATH_METRICS)
    async def metrics() -> Response:
        """Prometheus metrics of this peer (peers/metrics.py)."""
        body, content_type = node.metrics.render()
        return Response(body, media_type=content_type)

    @app.get(PATH_HEALTH)
    async def health() -> JSONResponse:
        me = node.table.me
        body = {
            "peer_id": node.peer_id,
            "address": me.address,
            "public_key": me.public_key,
            "model": node.model_id,
            "layers": [me.start, me.end],
            "total_layers": node.total_layers,
            "weights_bytes": node.weights_bytes,
            "quant": node.config.quant,
            "state": me.state,
            "sessions": node.block.open_sessions() if node.block else 0,
            "steps_served": node.steps_served,
            "incarnation": me.incarnation,
            "active_requests": node.active_requests,
            "threads": node.threads,
            "core_turns": node.scheduler.turns is not None,
            "cuda_graphs": node.block.graphs.to_json() if node.block and node.block.graphs else None,
            "failovers": node.failovers,
            "tokens_generated": node.metrics.tokens,
            "verification": {
                "rate": node.config.verify_rate,
                **node.verification.to_json(),
                "accusations_held": len(node.accusations),
                "accusations_ignored": node.accusations.ignored,
            },
            "speculation": {"enabled": node.config.speculative, **node.speculation.to_json()},
            "direct_return": {
                "enabled": node.config.direct_return,
                "in_flight": len(node.returns),
                "mean_step_ms": round(1000 * node.returns.step_s, 2),
                "late_step_probes": node.returns.probes,
                "results_taken": node.returns.taken,
                "results_ignored": node.returns.ignored,
            },
            "hop_path_ms": node.hop_times.to_json(),
            "queued_steps": len(node.scheduler),
            "scheduler": node.scheduler.stats.to_json(),
            "forwarded": {"messages": node.forwarder.messages, "frames": node.forwarder.frames},
            "prefix_cache": {
                "blocks": len(node.block.prefixes) if node.block else 0,
                "hit_positions": node.block.prefixes.hits if node.block else 0,
                "miss_positions": node.block.prefixes.misses if node.block else 0,
            },
        }
        return JSONResponse(body, status_code=200 if node.ready else 503)

    @app.post(PATH_STEPS)
    async def steps(request: Request) -> Response:
        """Several steps in one message; each runs as if it came alone, one result each."""
        t0 = time.perf_counter()
        body = await request.body()
        t1 = time.perf_counter()
        try:
            reqs = (
                await asyncio.to_thread(decode_steps, body) if len(body) > (1 << 20) else decode_steps(body)
            )
        except ProtocolError as e:
            return JSONResponse(step_error_body(str(e), None, "bad_request"), status_code=400)
        node.hop_times.add("read_body", t1 - t0, len(reqs))
        node.hop_times.add("decode", time.perf_counter() - t1, len(reqs))
        task = asyncio.ensure_future(asyncio.gather(*(_run(r) for r in reqs)))
        if not await unless_gone(task, request, "its steps"):  # the sender gave up: so does this peer
            return Response(status_code=499)
        return JSONResponse({"results": list(task.result())})

    async def _run(req) -> dict:
        REQUEST_ID.set(req.request_id)  # (this frame's own task: its logs carry the request's id)
        try:
            if req.reply_to is not None:  # returned directly: answered once checked and taken on
                await node.accept_step(req)
                return {"accepted": True}
            return step_result_body(await node.run_step(req))
        except HopFailed as e:
            return step_error_body(e.message, e.peer_id, e.reason)
        except Exception as e:  # one frame's bug must not fail the others of its message
            log.exception("step failed")
            return step_error_body(f"{type(e).__name__}: {e}", node.peer_id, "failed")

    @app.post(PATH_RESULTS)
    async def results(body: dict) -> Response:
        """Direct return: results (or failures) of this entry's steps, from a peer of their route."""
        sender, items = body.get("from"), body.get("results")
        if not isinstance(sender, str) or not isinstance(items, list) or len(items) > MAX_STEPS_PER_MESSAGE:
            return JSONResponse(step_error_body("bad results message", None, "bad_request"), status_code=400)
        taken = 0
        for item in items:
            step_id = item.get("step_id") if isinstance(item, dict) else None
            if isinstance(step_id, str):
                taken += node.returns.deliver(sender, step_id, outcome_of(item, sender))
        return JSONResponse({"taken": taken})

    @app.get(PATH_PROGRESS)
    async def progress(step: str) -> dict:
        """How far a step got here (the entry asks when the step is late)."""
        return {"state": node.progress.state(step)}

    @app.post(PATH_CLOSE)
    async def close(body: dict) -> dict:
        session_id = str(body.get("session_id"))
        node.scheduler.forget(session_id)
        closed = bool(node.block and node.block.close(session_id))
        return {"closed": closed}

    @app.post(PATH_GOSSIP)
    async def gossip(body: dict) -> dict:
        try:
            return node.gossip.receive(body)
        except (KeyError, TypeError, ValueError) as e:
            return JSONResponse({"error": {"message": f"bad gossip: {e}"}}, status_code=400)

    @app.get(PATH_TABLE)
    async def table() -> dict:
        t = node.table
        peers = [
            {**e.to_json(), "status": t.status(e.peer_id), "vouched": t.vouched(e.peer_id)} for e in t.known()
        ]
        counts = coverage(t.serving(node.model_id), node.total_layers)
        return {
            "me": node.peer_id,
            "address": node.table.me.address,
            "model": node.model_id,
            "total_layers": node.total_layers,
            "peers": peers,
            "coverage": counts,
            "gaps": gaps(counts),
            "declared_dead": [list(d) for d in t.deaths],
        }

    return app


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own answers (no such path, a method the path does not take) in OpenAI's error
    JSON, not as {"detail": ...}; a 405 keeps its Allow header."""
    where = f"{request.method} {request.url.path}"
    if error.status_code == 404:
        message, code = f"no such path here: {where}", "not_found"
    elif error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        message, code = f"the method is not allowed: {where} (allowed: {allowed})", "method_not_allowed"
    else:
        message, code = str(error.detail), None
    kind = InvalidRequest if error.status_code < 500 else SwarmError
    body = kind(message, code=code).to_json()
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)
