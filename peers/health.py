"""GET /health: this peer's identity and state and each component's counters, one section each;
200 while the peer serves its layers, 503 before (a readiness probe)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from peers.config import NodeConfig
from peers.entry.admission import Admission
from peers.node import PeerNode
from peers.swarm.commitments import Accusations, VerificationStats
from peers.swarm.routing import alone, coverage
from peers.transport.direct import Returns
from peers.transport.frames import PATH_HEALTH


def health(node: PeerNode, admission: Admission) -> dict:
    """The body of GET /health."""
    me, block, config = node.table.me, node.block, node.config
    return {
        "peer_id": node.peer_id,
        "address": me.address,
        "reach": me.reach or "unknown",  # whether peers could dial this one back (peers/swarm/reach.py)
        "public_key": me.public_key,
        "model": node.model_id,
        "layers": [me.start, me.end],
        "total_layers": node.total_layers,
        "weights_bytes": node.weights_bytes,
        "quant": config.quant,
        "state": me.state,
        "sessions": block.open_sessions() if block else 0,
        "steps_served": node.steps_served,
        "incarnation": me.incarnation,
        "active_requests": node.active_requests,
        "request_queue": admission.to_json(),  # its queue: running, waiting, their bounds and KV
        "cpus": list(node.cpus),
        "threads": node.threads,
        "core_turns": node.scheduler.turns is not None,
        "cuda_graphs": block.graphs.to_json() if block and block.graphs else None,
        "failovers": node.failovers,
        "claims": node.reputation.claims.to_json(),
        "tokens_generated": node.metrics.tokens,
        "verification": verification(
            config.verify_rate, node.verification, node.accusations, unchecked(node)
        ),
        "speculation": {"enabled": config.speculative, **node.speculation.to_json()},
        "direct_return": direct_return(config.direct_return, node.returns),
        "hop_path_ms": node.hop_times.to_json(),
        "queued_steps": len(node.scheduler),
        "scheduler": node.scheduler.stats.to_json(),
        "forwarded": node.forwarder.to_json(),
        "prefix_cache": prefix_cache(config),
    }


def verification(
    rate: float, stats: VerificationStats, accusations: Accusations, unchecked_layers: list[list[int]]
) -> dict:
    """What this entry's checks found, the spans no check of another peer could cover, and the
    accusations it holds or ignored."""
    return {"rate": rate, **stats.to_json(), "unchecked_layers": unchecked_layers, **accusations.to_json()}


def unchecked(node: PeerNode) -> list[list[int]]:
    """The layer spans exactly one serving peer serves (no replica or chain of others could
    recompute them: only the entry's own check, --self-referee, could)."""
    counts = coverage(node.table.serving(node.model_id), node.total_layers)
    return [list(span) for span in alone(counts)]


def direct_return(enabled: bool, returns: Returns) -> dict:
    """This entry's steps in flight under direct return, and what became of their results."""
    return {"enabled": enabled, **returns.to_json()}


def prefix_cache(config: NodeConfig) -> dict:
    """The prefix cache's budget and what requests entering here partition it by. Never what it
    holds, hit or missed: /health is open, and a hit would tell a caller that someone else sent
    its prompt (those counters are in /metrics behind --metrics-key)."""
    return {
        "max_tokens": config.prefix_cache_tokens if config.prefix_reuse else 0,
        "partitioned_by": "api_key" if config.api_keys else "client_host",
    }


def health_router(node: PeerNode, admission: Admission) -> APIRouter:
    """GET /health over `node` and its door's `admission`."""
    router = APIRouter()

    @router.get(PATH_HEALTH)
    async def answer() -> JSONResponse:
        return JSONResponse(health(node, admission), status_code=200 if node.ready else 503)

    return router
