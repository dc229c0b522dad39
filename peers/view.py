"""The swarm page every peer serves (`GET /`) and the data it draws (`GET /view`): the layers x
peers coverage map, each peer's state, load and speed, and this entry's recent failovers. The
page is plain HTML and JavaScript (peers/page.html, no build step); it asks `/view` once a
second and redraws without reloading.

`/view` is this peer's table (as `/swarm/table` gives it), each live peer's own /health counters
(asked by this peer, in parallel, cached for 1 s so that any number of open pages cost one round),
and this entry's recent failovers. The table's addresses come from gossip, anyone's: an answer is
read whole within 1 s and 64 KiB or not at all, so a peer that trickles, floods or never answers
shows as unreachable (`reachable: false`), and no page waits on a round longer than that. In a
private swarm (--swarm-key) the table is not for strangers: `/view` answers only clients on
loopback (an operator on the machine, or through `ssh -L`)."""

import asyncio
import ipaddress
import json
import time
from collections.abc import Sequence
from importlib.resources import files

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from peers.swarm.membership import Table
from peers.swarm.routing import coverage, gaps
from peers.transport.errors import Forbidden
from peers.transport.frames import PATH_HEALTH, PATH_VIEW
from peers.transport.limits import fetch_capped

HEALTH_TIMEOUT_S = 1.0  # a peer's whole /health answer, from connecting to its last byte
MAX_HEALTH_BYTES = 64 << 10  # a /health answer is ~2 KiB
CACHE_S = 1.0
MAX_ASKED = 64  # peers whose /health one view asks for
PAGE = files(__package__).joinpath("page.html").read_bytes()


def loopback(host: str | None) -> bool:
    """Whether `host` (a client's address) is on this machine."""
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def view_router(view: "View", private: bool) -> APIRouter:
    """GET / (the page) and GET /view (its data: on loopback only where `private`)."""
    router = APIRouter()

    @router.get("/")
    async def page() -> Response:
        """The swarm page (peers/page.html): it draws GET /view once a second."""
        return Response(PAGE, media_type="text/html; charset=utf-8")

    @router.get(PATH_VIEW)
    async def view_data(request: Request) -> Response:
        if private and not loopback(request.client.host if request.client else None):
            raise Forbidden(
                "this is a private swarm: its page answers on loopback only", code="loopback_only"
            )
        return JSONResponse(await view.snapshot())

    return router


class View:
    """The data of the swarm page, built at most once a second: from this peer's `table`, other
    peers' /health (asked over `http`) and this entry's recent `failovers`."""

    def __init__(
        self,
        table: Table,
        http: httpx.AsyncClient,
        model_id: str,
        total_layers: int,
        failovers: Sequence[dict],
    ):
        self.table, self.http, self.failovers = table, http, failovers
        self.model_id, self.total_layers = model_id, total_layers
        self._cached: tuple[float, dict] | None = None
        self._round: asyncio.Future | None = None  # the round of /health requests under way

    async def snapshot(self) -> dict:
        """The page's data: the last round's if under CACHE_S old, else the round under way (one
        for all concurrent pages, each of them free to hang up without stopping it)."""
        if self._cached is not None and time.monotonic() - self._cached[0] <= CACHE_S:
            return self._cached[1]
        if self._round is None:
            self._round = asyncio.ensure_future(self._build_round())
        return await asyncio.shield(self._round)

    async def _build_round(self) -> dict:
        try:
            started = time.monotonic()
            data = await self._build()
            self._cached = (started, data)
            return data
        finally:
            self._round = None

    async def _build(self) -> dict:
        t, me = self.table, self.table.me.peer_id
        rows = []
        for e in t.known():
            status = t.status(e.peer_id) or "unknown"
            rows.append(
                {
                    "peer_id": e.peer_id,
                    "address": e.address,
                    "model": e.model,
                    "layers": [e.start, e.end],
                    "status": status,
                    "load": e.load,
                    "layer_ms": e.layer_ms,
                    "me": e.peer_id == me,
                }
            )
        rows.sort(key=lambda r: (r["layers"][0], r["layers"][1], r["peer_id"]))
        asked = [r for r in rows if r["status"] not in ("dead", "left")][:MAX_ASKED]
        healths = await asyncio.gather(*(self._health(r["address"]) for r in asked))
        for row, health in zip(asked, healths, strict=True):
            row["health"], row["reachable"] = health, health is not None
        counts = coverage(t.serving(self.model_id), self.total_layers)
        return {
            "me": me,
            "model": self.model_id,
            "total_layers": self.total_layers,
            "time": time.time(),
            "peers": rows,
            "coverage": counts,
            "gaps": gaps(counts),
            "failovers": list(self.failovers),
        }

    async def _health(self, address: str) -> dict | None:
        """The numbers the page shows of the peer at `address`, or None: it did not answer a
        whole JSON object of MAX_HEALTH_BYTES at most within HEALTH_TIMEOUT_S."""
        url = f"http://{address}{PATH_HEALTH}"
        try:
            h = json.loads(
                (await fetch_capped(self.http, "GET", url, HEALTH_TIMEOUT_S, MAX_HEALTH_BYTES)).content
            )
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(h, dict):
            return None
        sched = h.get("scheduler") if isinstance(h.get("scheduler"), dict) else {}
        hop = h.get("hop_path_ms") if isinstance(h.get("hop_path_ms"), dict) else {}
        pick = {
            "sessions": h.get("sessions"),
            "steps_served": h.get("steps_served"),
            "active_requests": h.get("active_requests"),
            "tokens_generated": h.get("tokens_generated"),
            "queue_wait_ms": sched.get("mean_queue_wait_ms"),
            "compute_ms": hop.get("compute"),
        }
        return {k: v for k, v in pick.items() if isinstance(v, int | float) and not isinstance(v, bool)}
