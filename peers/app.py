"""The peer's FastAPI app, assembled: the middleware stack (metrics, CORS, request ids, body
limits, auth, outermost first), the error answers, and every router on one port (the OpenAI API and its
Responses API, the service routes, the page, /metrics, /health, the swarm protocol)."""

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from peers.api.openai_routes import OpenAIDoor
from peers.api.openai_routes import router as openai_router
from peers.api.responses import router as responses_router
from peers.api.service_routes import router as service_router
from peers.entry.admission import Admission
from peers.health import health_router
from peers.metrics import HTTPMetrics, Readings, metrics_router
from peers.node import PeerNode
from peers.swarm_routes import SwarmRoutes
from peers.transport.auth import Guard
from peers.transport.errors import InvalidRequest, SwarmError, install_handlers
from peers.transport.frames import PATH_METRICS, PATH_STEPS
from peers.transport.limits import BodyLimits
from peers.transport.logs import REQUEST_ID_HEADER, RequestIds
from peers.view import View, view_router

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def build_app(node: PeerNode, lifespan: Lifespan | None = None) -> FastAPI:
    """The app over `node`, its life (start, leave, close) in `lifespan`."""
    app = FastAPI(title="LayerSwarm peer", lifespan=lifespan)
    install_handlers(app)
    app.add_exception_handler(HTTPException, http_error)
    add_middleware(app, node)
    door = OpenAIDoor(node)  # (one admission queue for both APIs)
    node.metrics.watch(readings(node, door.admission))
    app.include_router(openai_router(door))
    app.include_router(responses_router(door))
    app.include_router(service_router(node))
    view = View(node.table, node.http, node.model_id, node.total_layers, node.failover_log)
    app.include_router(view_router(view, private=node.config.swarm_key is not None))
    app.include_router(metrics_router(node.metrics))
    app.include_router(health_router(node, door.admission))
    app.include_router(SwarmRoutes(node).router())
    return app


def add_middleware(app: FastAPI, node: PeerNode) -> None:
    """Each one added wraps those before it: the last added sees a request first."""
    config = node.config
    metrics = (PATH_METRICS, config.metrics_key) if config.metrics_key is not None else None
    app.add_middleware(Guard, swarm_key=config.swarm_key, api_keys=config.api_keys, metrics=metrics)
    app.add_middleware(  # outside Guard: caps what Guard reads too
        BodyLimits,
        cap_for=lambda path: node.max_steps_body_bytes if path == PATH_STEPS else node.config.max_body_bytes,
        read_timeout_s=config.read_timeout_s,
    )
    # outside Guard and the limits: the requests they refuse are logged and counted too
    app.add_middleware(RequestIds)
    if config.allowed_origins:  # outside Guard: a preflight carries no API key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER],
        )
    app.add_middleware(HTTPMetrics, metrics=node.metrics)


def readings(node: PeerNode, admission: Admission) -> Readings:
    """What /metrics reads from the node's components at each scrape."""
    return Readings(
        table=node.table,
        forwarder=node.forwarder,
        bans=node.bans,
        verification=node.verification,
        speculation=node.speculation,
        model_id=node.model_id,
        kv_budget_tokens=node.config.max_cache_tokens,
        block=lambda: node.block,
        ready=lambda: node.ready,
        queued_steps=lambda: len(node.scheduler),
        active_requests=lambda: node.active_requests,
        waiting_requests=lambda: len(admission.waiting),
        steps_served=lambda: node.steps_served,
        prefix_counters=node.config.metrics_key is not None,
    )


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
