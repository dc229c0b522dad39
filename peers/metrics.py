"""Prometheus metrics of one peer (`GET /metrics`, prometheus-client's text format).

Each peer has a registry of its own, so that several peers can share a process (the in-process
tests). What the peer's components already count for /health (sessions, KV slots, the table,
bans, verification, drafting) is read when scraped, through `Readings`; what has a distribution
(time to the first token, between tokens, queue waits, forwards, batch sizes, gossip round trips)
is observed where it happens. Label sets are bounded: HTTP endpoints are the app's own routes
(any other path counts as "other"), failover reasons are HopFailed.REASONS. The prefix cache's
hits and misses are shown only behind --metrics-key (a hit tells that someone sent that prompt).
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from inference.block import Block
from peers.entry.speculative import SpeculationStats
from peers.swarm.commitments import VerificationStats
from peers.swarm.membership import Table
from peers.swarm.reputation import Bans
from peers.transport.errors import HopFailed
from peers.transport.forwarder import Forwarder
from peers.transport.frames import PATH_METRICS
from peers.transport.wire import ENCODINGS

PREFIX = "layerswarm"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
OTHER = "other"


class Metrics:
    """The metrics a peer observes as things happen, and the text of a scrape."""

    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._collector: PeerCollector | None = None
        histogram, counter = partial(_new_histogram, r), partial(_new_counter, r)
        self.http_requests = counter(
            "http_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"]
        )
        self.http_seconds = histogram(
            "http_request_duration_seconds",
            "Time from a request's arrival to the end of its response (a stream: its last event)",
            TTFT_BUCKETS,
            ["endpoint"],
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the requests this entry ran")
        self.generated_tokens = counter(
            "generated_tokens", "Tokens this entry generated (the completions' usage)"
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "From the start of a generation to its first token", TTFT_BUCKETS
        )
        self.inter_token = histogram(
            "inter_token_seconds",
            "Between two steps' tokens of a generation, as they reach the entry (drafted tokens the model "
            "kept arrive one after the other at once: gaps near 0)",
            LATENCY_BUCKETS,
        )
        self.queue_wait = histogram(
            "step_queue_wait_seconds",
            "How long a step waited in this peer's queue before its first forward",
            LATENCY_BUCKETS,
        )
        self.forward_seconds = histogram(
            "forward_seconds",
            "Compute time of one forward of this peer's layers (a batch of steps)",
            LATENCY_BUCKETS,
        )
        self.batch_steps = histogram("forward_batch_steps", "Steps in one forward", COUNT_BUCKETS)
        self.batch_positions = histogram(
            "forward_batch_positions", "Positions (tokens x sequences) in one forward", COUNT_BUCKETS
        )
        self.failovers = counter(
            "failovers", "Re-routes this entry made, by the failed hop's reason", ["reason"]
        )
        for reason in HopFailed.REASONS:  # every reason shows, at 0 until it happens
            self.failovers.labels(reason)
        self.gossip_seconds = histogram(
            "gossip_round_trip_seconds",
            "One gossip exchange with another peer, answered or failed",
            LATENCY_BUCKETS,
        )
        self.gossip_failures = counter("gossip_failures", "Gossip exchanges that got no usable answer")
        self.tokens = 0  # generated_tokens, as a number for /health

    def watch(self, readings: "Readings") -> None:
        """Read the peer's components at each scrape (again: the latest readings replace any
        earlier ones, so that a second app over the same peer does not count it twice)."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._collector = PeerCollector(readings)
        self.registry.register(self._collector)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def metrics_router(metrics: Metrics) -> APIRouter:
    """GET /metrics: a scrape of `metrics`."""
    router = APIRouter()

    @router.get(PATH_METRICS)
    async def scrape() -> Response:
        """Prometheus metrics of this peer (peers/metrics.py)."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return router


@dataclass(frozen=True)
class Readings:
    """What a scrape reads: the components that count, and callables for the values that change
    or come late (the block exists once loaded)."""

    table: Table
    forwarder: Forwarder
    bans: Bans
    verification: VerificationStats
    speculation: SpeculationStats
    model_id: str
    kv_budget_tokens: int  # --max-cache-tokens
    block: Callable[[], Block | None]
    ready: Callable[[], bool]
    queued_steps: Callable[[], int]
    active_requests: Callable[[], int]
    waiting_requests: Callable[[], int]  # of those, queued for admission (--max-waiting)
    steps_served: Callable[[], int]
    prefix_counters: bool  # the prefix cache's hits and misses (only where /metrics needs a key)


class PeerCollector:
    """What the peer counts anyway, read at each scrape."""

    def __init__(self, readings: Readings):
        self.readings = readings

    def describe(self) -> list:
        return []  # (collected at scrape time only: the peer may not have its block yet)

    def collect(self) -> Iterator[Metric]:
        yield from self.peer()
        yield from self.wire()
        yield from self.table()
        yield from self.checks()
        if self.readings.prefix_counters:
            yield from self.prefixes()

    def peer(self) -> Iterator[Metric]:
        """This peer: who it is, whether it serves, what it holds and what waits."""
        r = self.readings
        me, block = r.table.me, r.block()
        info = InfoMetricFamily(f"{PREFIX}_peer", "This peer: its id, model and layers")
        info.add_metric([], {"peer_id": me.peer_id, "model": r.model_id, "layers": f"{me.start}:{me.end}"})
        yield info
        yield _gauge("ready", "1 while this peer serves its layers", int(r.ready()))
        yield _gauge("served_layers", "Layers this peer serves", me.end - me.start)
        yield _gauge(
            "sessions", "Sessions this peer holds KV caches for", block.open_sessions() if block else 0
        )
        yield _gauge(
            "kv_slots_used",
            "KV cache token slots in use (batch x positions)",
            block.sessions.used_tokens if block else 0,
        )
        yield _gauge("kv_slots_budget", "KV cache token slots this peer may use", r.kv_budget_tokens)
        yield _gauge("queued_steps", "Steps waiting in this peer's queue", r.queued_steps())
        yield _gauge("active_requests", "OpenAI requests this entry is answering", r.active_requests())
        yield _gauge(
            "waiting_requests",
            "Of those, requests queued for admission (--max-waiting)",
            r.waiting_requests(),
        )
        yield _counter("steps_served", "Steps this peer computed and answered", r.steps_served())

    def wire(self) -> Iterator[Metric]:
        """Hidden-state frames sent to next hops, by encoding."""
        frames = CounterMetricFamily(
            f"{PREFIX}_wire_frames",
            "Frames of hidden states this peer sent to next hops, by encoding (--wire, negotiated per hop)",
            labels=["encoding"],
        )
        sent = CounterMetricFamily(
            f"{PREFIX}_wire_bytes", "Bytes of those frames, their headers included", labels=["encoding"]
        )
        forwarder = self.readings.forwarder
        for encoding in ENCODINGS:
            frames.add_metric([encoding], forwarder.hidden_frames[encoding])
            sent.add_metric([encoding], forwarder.hidden_bytes[encoding])
        yield frames
        yield sent

    def table(self) -> Iterator[Metric]:
        """The peers this peer knows, by status, and those it avoids."""
        table = self.readings.table
        peers = GaugeMetricFamily(
            f"{PREFIX}_table_peers", "Peers in this peer's table, by status", labels=["status"]
        )
        counts: dict[str, int] = {}
        for entry in table.known():
            status = table.status(entry.peer_id)
            counts[status] = counts.get(status, 0) + 1
        for status, count in sorted(counts.items()):
            peers.add_metric([status], count)
        yield peers
        dropped = CounterMetricFamily(
            f"{PREFIX}_gossip_dropped_entries",
            "Gossiped entries this peer did not take, by reason (a source over its rate, the "
            "unvouched budget full, evicted, expired unvouched)",
            labels=["reason"],
        )
        for reason, count in sorted(table.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        incarnations = {e.peer_id: e.incarnation for e in table.known()}
        yield _gauge(
            "banned_peers",
            "Peers this entry avoids now (failures and convictions)",
            len(self.readings.bans.banned(incarnations)),
        )

    def checks(self) -> Iterator[Metric]:
        """Verification by other replicas, and drafting."""
        v = self.readings.verification
        yield _counter(
            "verified_requests", "Requests this entry had recomputed by other replicas", v.requests
        )
        yield _counter("verified_steps", "Steps compared with another replica's computation", v.steps)
        yield _counter(
            "unchecked_steps", "Steps of checked requests that no other replica recomputed", v.unchecked_steps
        )
        yield _counter(
            "verification_disagreements", "Steps two replicas computed differently", v.disagreements
        )
        yield _gauge(
            "convicted_peers", "Peers this entry convicted of lying (the latest 64)", len(v.convicted)
        )
        s = self.readings.speculation
        yield _counter("drafted_steps", "Steps that carried drafted tokens", s.steps)
        yield _counter("drafted_tokens", "Tokens drafted by this entry", s.drafted)
        yield _counter("accepted_draft_tokens", "Drafted tokens the model kept", s.accepted)

    def prefixes(self) -> Iterator[Metric]:
        """The prefix cache: what it holds, and the prompt positions it saved or missed."""
        block = self.readings.block()
        cache = block.prefixes.to_json() if block else {"blocks": 0, "hit_positions": 0, "miss_positions": 0}
        yield _gauge(
            "prefix_cache_blocks", "Prompt blocks whose KV this peer keeps for reuse", cache["blocks"]
        )
        yield _counter(
            "prefix_hit_positions", "Prompt positions restored from the prefix cache", cache["hit_positions"]
        )
        yield _counter(
            "prefix_miss_positions",
            "Prompt positions looked for in the prefix cache and absent",
            cache["miss_positions"],
        )


def _new_histogram(r: CollectorRegistry, name: str, doc: str, buckets: tuple, labels=()) -> Histogram:
    return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets, registry=r)


def _new_counter(r: CollectorRegistry, name: str, doc: str, labels=()) -> Counter:
    return Counter(f"{PREFIX}_{name}", doc, labels, registry=r)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class HTTPMetrics:
    """ASGI middleware: counts every request by endpoint and status, and times it to the end of
    its response. The endpoint is the path of the app's route that answered (its template, were
    it to have parameters); a request no route answered counts as "other", so that the label
    stays bounded whatever strangers ask for."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            endpoint = getattr(scope.get("route"), "path", None) or OTHER  # (set by the router)
            self.metrics.http_requests.labels(endpoint, str(status[0])).inc()
            self.metrics.http_seconds.labels(endpoint).observe(time.perf_counter() - started)
