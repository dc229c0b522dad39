"""The peer's app in-process (httpx.ASGITransport over create_app, one tiny peer): /health's fields
(each section a component's to_json()), /metrics read from the peer's components, the /swarm
routes' refusals of bad messages, and Starlette's own 404 and 405 in OpenAI's error JSON."""

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from inference.prefix_cache import PrefixCache
from peers.server import create_app
from peers.swarm.commitments import Accusations
from peers.transport.direct import UNKNOWN, Returns
from peers.transport.forwarder import Forwarder
from tests.peers.test_inprocess import start_swarm, stop_swarm

HEALTH_FIELDS = {
    "peer_id",
    "address",
    "reach",
    "public_key",
    "model",
    "layers",
    "total_layers",
    "weights_bytes",
    "quant",
    "state",
    "sessions",
    "steps_served",
    "incarnation",
    "claims",
    "active_requests",
    "request_queue",
    "threads",
    "cpus",
    "core_turns",
    "cuda_graphs",
    "failovers",
    "tokens_generated",
    "verification",
    "speculation",
    "direct_return",
    "hop_path_ms",
    "queued_steps",
    "scheduler",
    "forwarded",
    "prefix_cache",
}


def ask(model, *requests: tuple[str, str, dict]) -> tuple[object, list[httpx.Response]]:
    """(the node, the answers of `requests`: (method, path, httpx keyword arguments)) from one
    serving peer of all of `model`'s layers, through a second app over the same node."""

    async def main():
        _, (node,) = await start_swarm(model, ["0:4"])
        app = create_app(node)  # (a second app over the node: its metrics must not count twice)
        try:
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
            async with httpx.AsyncClient(transport=transport, base_url="http://peer") as http:
                return node, [await http.request(method, path, **kw) for method, path, kw in requests]
        finally:
            await stop_swarm([node])

    return asyncio.run(main())


def test_health_answers_every_field(tiny_llama):
    node, (r,) = ask(tiny_llama, ("GET", "/health", {}))
    assert r.status_code == 200, r.text
    h = r.json()
    assert set(h) == HEALTH_FIELDS
    assert h["peer_id"] == node.peer_id and h["layers"] == [0, 4] and h["total_layers"] == 4
    assert h["state"] == "serving" and h["model"] == node.model_id and h["quant"] == node.config.quant
    assert set(h["verification"]) == {
        "rate",
        "requests",
        "steps",
        "unchecked_steps",
        "disagreements",
        "unverifiable",
        "convicted",
        "unchecked_layers",
        "accusations_held",
        "accusations_ignored",
    }
    assert set(h["direct_return"]) == {
        "enabled",
        "in_flight",
        "mean_step_ms",
        "late_step_probes",
        "results_taken",
        "results_ignored",
    }
    assert h["speculation"]["enabled"] == node.config.speculative
    assert h["prefix_cache"] == {
        "max_tokens": node.config.prefix_cache_tokens,
        "partitioned_by": "client_host",
    }
    assert h["forwarded"] == {"messages": 0, "frames": 0}
    assert h["request_queue"]["running"] == h["request_queue"]["waiting"] == 0
    assert (h["request_queue"]["max_running"], h["request_queue"]["max_waiting"]) == (64, 256)
    assert set(h["hop_path_ms"]) == {"read_body", "decode", "check", "queue", "compute", "hand_on"}
    # each section is its component's to_json(), in the order /health always gave
    assert list(h["direct_return"]) == ["enabled", *node.returns.to_json()]
    assert h["direct_return"] == {"enabled": node.config.direct_return, **node.returns.to_json()}
    assert list(h["verification"])[-2:] == ["accusations_held", "accusations_ignored"]
    assert h["verification"]["accusations_held"] == node.accusations.to_json()["accusations_held"]
    assert h["forwarded"] == node.forwarder.to_json()


def test_metrics_read_the_peer_once(tiny_llama):
    node, (r,) = ask(tiny_llama, ("GET", "/metrics", {}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    samples = [s for family in text_string_to_metric_families(r.text) for s in family.samples]
    ready = [s for s in samples if s.name == "layerswarm_ready"]
    assert [s.value for s in ready] == [1]  # one reading, though two apps were built over the node
    named = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}
    info = {"peer_id": node.peer_id, "model": node.model_id, "layers": "0:4"}
    assert named[("layerswarm_peer_info", tuple(sorted(info.items())))] == 1
    assert named[("layerswarm_served_layers", ())] == 4
    assert named[("layerswarm_kv_slots_budget", ())] == node.config.max_cache_tokens
    assert named[("layerswarm_waiting_requests", ())] == 0
    assert named[("layerswarm_table_peers", (("status", "serving"),))] == 1
    assert named[("layerswarm_wire_frames_total", (("encoding", "lossless"),))] == 0
    assert named[("layerswarm_failovers_total", (("reason", "failed"),))] == 0


def test_the_swarm_routes_refuse_bad_messages(tiny_llama):
    node, answers = ask(
        tiny_llama,
        ("POST", "/swarm/steps", {"content": b"not a frame"}),
        ("POST", "/swarm/results", {"json": {"from": 7, "results": []}}),
        ("POST", "/swarm/results", {"json": {"from": "x", "results": [{"step_id": "nope"}, 3]}}),
        ("POST", "/swarm/gossip", {"json": {"challenge": "short"}}),
        ("POST", "/swarm/gossip", {"json": {}}),
        ("GET", "/swarm/progress", {"params": {"step": "nope"}}),
        ("POST", "/swarm/close", {"json": {"session_id": "nope"}}),
        ("GET", "/swarm/table", {}),
    )
    steps, bad_results, no_such_step, short_challenge, no_challenge, progress, close, table = answers
    assert steps.status_code == 400 and steps.json()["error"]["type"] == "bad_request", steps.text
    assert bad_results.status_code == 400 and bad_results.json()["error"]["type"] == "bad_request"
    assert no_such_step.status_code == 200 and no_such_step.json() == {"taken": 0}
    for r in (short_challenge, no_challenge):
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("bad gossip"), r.text
    assert progress.json() == {"state": UNKNOWN}
    assert close.json() == {"closed": False}
    t = table.json()
    assert t["me"] == node.peer_id and t["gaps"] == [] and t["total_layers"] == 4
    assert [p["peer_id"] for p in t["peers"]] == [node.peer_id] and t["peers"][0]["status"] == "serving"


def test_starlettes_own_answers_speak_openais_error_json(tiny_llama):
    _, (missing, wrong_method) = ask(tiny_llama, ("GET", "/nowhere", {}), ("GET", "/swarm/steps", {}))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert "GET /nowhere" in missing.json()["error"]["message"]
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert wrong_method.headers["allow"] == "POST"


def test_the_health_sections_read_their_components_counters():
    returns = Returns()
    returns.step_s, returns.taken, returns.ignored, returns.probes = 0.012345, 3, 2, 1
    assert returns.to_json() == {
        "in_flight": 0,
        "mean_step_ms": 12.35,
        "late_step_probes": 1,
        "results_taken": 3,
        "results_ignored": 2,
    }
    prefixes = PrefixCache(64)
    prefixes.hits, prefixes.misses = 32, 16
    assert prefixes.to_json() == {"blocks": 0, "hit_positions": 32, "miss_positions": 16}
    accusations = Accusations(lambda peer_id: None, lambda peer_id: None, 60.0, trusted=False)
    accusations.ignored = 4
    assert accusations.to_json() == {"accusations_held": 0, "accusations_ignored": 4}
    forwarder = Forwarder("me", None, hop_timeout_s=1.0, per_token_s=0.0)
    forwarder.messages, forwarder.frames = 5, 7
    assert forwarder.to_json() == {"messages": 5, "frames": 7}
