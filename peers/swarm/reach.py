"""Whether others can dial this peer: found, not configured. A peer asks a few peers it knows to
dial it back at the port it announced (as libp2p's AutoNAT does) and publishes the verdict in
its signed entry (`reach`). The peer asked dials only the host the question came from: nobody
can make a peer dial a third party. Each port of a host is answered at most once every
ANSWER_EVERY_S, and at most MAX_ANSWERS questions in all in that time (peers sharing a machine
ask at once, each for its own port).

A peer that nobody can dial (behind a home router, or announcing an address that is not its
own) serves no route at other entries (they route only to peers they dialled themselves:
peers/swarm/gossip.py), and as an entry it cannot take results sent to its address: it keeps its
steps' results on its own connections (no direct return). /health and `peer status` say so."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import httpx

from peers.swarm.membership import Table
from peers.swarm.record import DIRECT, UNREACHABLE

log = logging.getLogger("layerswarm.gossip")

PATH_DIALBACK = "/swarm/dialback"
ASK_PEERS = 3  # peers asked to dial back at each check
CHECK_EVERY_S = 300.0  # a check this often (and at once after joining)
RETRY_S = 10.0  # sooner while nobody answered
DIAL_TIMEOUT_S = 2.0
ANSWER_EVERY_S = 5.0  # one host's questions about one port are answered at most this often
MAX_ANSWERS = 16  # questions answered in all within ANSWER_EVERY_S
ANSWER_BYTES = 64 << 10  # what a dial-back reads of the answer at the port dialled

Fetch = Callable[..., Awaitable[httpx.Response]]


class Reachability:
    """This peer's checks of its own reachability, and its answers to others' questions."""

    def __init__(self, table: Table, fetch: Fetch, clock=time.monotonic):
        """`fetch(method, url, timeout_s, cap, **kw)`: a bounded exchange (limits.fetch_capped
        over the peer's HTTP client: signed in a private swarm)."""
        self.table, self.fetch, self.clock = table, fetch, clock
        self._next_check = 0.0
        self._checking = False
        self._answered: dict[tuple[str, int], float] = {}  # (host, port) -> when last answered
        self.checks = 0

    def due(self) -> bool:
        """Whether a check should start now (none running, and its time has come)."""
        return not self._checking and self.clock() >= self._next_check

    async def check(self) -> str:
        """Ask up to ASK_PEERS live vouched peers to dial this peer back; publish `reach`:
        "direct" where one reached it, "none" where all that answered could not; unchanged
        (and asked again after RETRY_S) where nobody answered."""
        self._checking = True
        try:
            me = self.table.me
            port = int(me.address.rpartition(":")[2])
            others = [
                e for e in self.table.live() if e.peer_id != me.peer_id and self.table.vouched(e.peer_id)
            ]
            answers = await asyncio.gather(
                *(self._ask(e.address, me.peer_id, port) for e in others[:ASK_PEERS])
            )
            answered = [a for a in answers if a is not None]
            self.checks += 1
            if not answered:
                self._next_check = self.clock() + RETRY_S
                return me.reach
            reach = DIRECT if any(answered) else UNREACHABLE
            self._next_check = self.clock() + CHECK_EVERY_S
            if reach != me.reach:
                if reach == UNREACHABLE:
                    log.warning(
                        "no peer could dial this peer at %s: its layers serve no route at other entries, "
                        "and its own requests keep their results on its connections (see README, Networks)",
                        me.address,
                    )
                self.table.update_me(reach=reach)
            return reach
        finally:
            self._checking = False

    async def _ask(self, address: str, peer_id: str, port: int) -> bool | None:
        try:
            r = await self.fetch(
                "POST",
                f"http://{address}{PATH_DIALBACK}",
                DIAL_TIMEOUT_S * 2,
                ANSWER_BYTES,
                json={"peer_id": peer_id, "port": port},
            )
            reached = r.json().get("reachable") if r.status_code == 200 else None
            return reached if isinstance(reached, bool) else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None

    async def answer(self, body: object, host: str) -> tuple[int, dict]:
        """Dial `host` (the asker's own) at body["port"]: whether the peer body["peer_id"]
        answers there. (400: a bad question; 429: this host asked too recently.)"""
        if not isinstance(body, dict) or body.keys() != {"peer_id", "port"}:
            return 400, {"error": {"message": "a dial-back question is {peer_id, port} and nothing else"}}
        peer_id, port = body["peer_id"], body["port"]
        if not isinstance(peer_id, str) or not isinstance(port, int) or not 0 < port < 65536:
            return 400, {"error": {"message": "peer_id is a string, port an integer in 1-65535"}}
        now = self.clock()
        self._answered = {k: t for k, t in self._answered.items() if now - t < ANSWER_EVERY_S}
        if (host, port) in self._answered or len(self._answered) >= MAX_ANSWERS:
            why = f"one dial-back question per port every {ANSWER_EVERY_S:g} s, {MAX_ANSWERS} in all"
            return 429, {"error": {"message": why}}
        self._answered[host, port] = now
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            r = await self.fetch("GET", f"http://{where}/health", DIAL_TIMEOUT_S, ANSWER_BYTES)
            reached = r.status_code == 200 and r.json().get("peer_id") == peer_id
        except (httpx.HTTPError, ValueError, AttributeError):
            reached = False
        return 200, {"reachable": reached, "seen_as": host}
