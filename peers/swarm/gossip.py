"""The gossip loop: every interval, push-pull with a few random vouched peers, a few not vouched for
yet, and seeds not yet reached. A message carries this peer's own entry and those it vouched for (at
most what a receiver takes); the table itself (peers/swarm/membership.py) is pure data.

Each exchange carries a fresh challenge; the answering peer signs it with its identity, so the
caller learns which peer answers at the address it dialled (it vouches for that peer: only
vouched peers are routed to, and relayed). What a message brings is counted against its source:
the host that pushed it, or the host of the address dialled."""

import asyncio
import base64
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable

import httpx

from peers.swarm.commitments import Accusations
from peers.swarm.identity import verify
from peers.swarm.membership import Table, parse_entries

log = logging.getLogger("layerswarm.gossip")

PATH_GOSSIP = "/swarm/gossip"


class Gossip:
    def __init__(
        self,
        table: Table,
        post: Callable[..., Awaitable[httpx.Response]],
        seeds: list[str],
        before_round: Callable[[], None],
        accusations: Accusations,
        metrics=None,
    ):
        """`post(url, timeout_s, json=...)` sends one exchange and reads its bounded answer
        (peers/transport/limits.py's post_capped over the peer's HTTP client); `metrics`, if
        given, times the exchanges and counts the failed ones (peers/metrics.py)."""
        self.table, self.post, self.seeds = table, post, seeds
        self.before_round = before_round  # the node's housekeeping: heartbeat, load, expiry
        self.accusations = accusations  # relayed with the table, checked on receipt
        self.metrics = metrics

    @property
    def settings(self):
        return self.table.settings

    async def loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pause = self.settings.interval_s * random.uniform(0.8, 1.2)
            before = loop.time()
            await asyncio.sleep(pause)
            if loop.time() - before - pause > self.settings.suspect_after_s:
                # This process was frozen or starved: its silence view is stale, not the others'.
                log.warning("gossip stalled for %.1f s; refreshing the view", loop.time() - before)
                self.table.forgive()
            try:
                self.before_round()
                for dead in self.table.sweep():
                    log.info("peer %s declared dead", dead)
                await self.round(self.table.gossip_targets(self.seeds))
            except Exception:  # the loop must outlive any one bad round
                log.exception("gossip round failed")

    async def round(self, targets: list[str], fanout_all: bool = False) -> None:
        if fanout_all:  # (peers vouched for first: strangers' entries do not crowd them out)
            me, table = self.table.me.peer_id, self.table
            others = sorted(
                (e for e in table.live() if e.peer_id != me), key=lambda e: not table.vouched(e.peer_id)
            )
            targets = list(dict.fromkeys(e.address for e in others))[:32]
        await asyncio.gather(*(self._exchange(t) for t in targets))

    async def _exchange(self, address: str) -> None:
        started, ok = time.perf_counter(), False
        try:
            ok = await self._exchange_with(address)
        finally:
            if self.metrics is not None:
                self.metrics.gossip_seconds.observe(time.perf_counter() - started)
                if not ok:
                    self.metrics.gossip_failures.inc()

    async def _exchange_with(self, address: str) -> bool:
        """One exchange: True if the peer answered with a usable message."""
        challenge = base64.urlsafe_b64encode(os.urandom(18)).decode()
        body = {**self._message(), "challenge": challenge}
        proved: tuple[str, int] | None = None
        try:
            r = await self.post(f"http://{address}{PATH_GOSSIP}", self.settings.timeout_s, json=body)
            r.raise_for_status()
            reply = r.json()
            self._take(reply, source_of(address))
            proof = reply["proof"]
            peer_id, incarnation = proof["peer_id"], proof["incarnation"]
            entry = self.table.get(peer_id) if isinstance(peer_id, str) else None
            if (
                entry is not None
                and entry.address == address
                and entry.incarnation == incarnation
                and verify(
                    entry.public_key, proof["signature"], proof_message(challenge, peer_id, incarnation)
                )
            ):  # the peer at this address is this life of that identity
                proved = peer_id, incarnation
            return True
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            log.debug("gossip with %s failed: %s", address, e)
            return False
        finally:
            self.table.dialled(address, *(proved or (None, None)))

    def receive(self, body: dict, source: str = "") -> dict:
        """Merge a peer's gossip, pushed from the host `source`, and answer with this peer's
        entries and its signature of the caller's challenge (ValueError, and nothing merged, if
        anything is invalid)."""
        challenge = body["challenge"]
        if not isinstance(challenge, str) or not 16 <= len(challenge) <= 64:
            raise ValueError("challenge must be a string of 16 to 64 characters")
        unknown = body.keys() - {"entries", "challenge", "accusations"}
        if unknown:
            raise ValueError(f"unknown gossip fields {sorted(unknown)}")
        self._take(body, source)
        me = self.table.me
        signature = self.table.identity.sign(proof_message(challenge, me.peer_id, me.incarnation))
        proof = {"peer_id": me.peer_id, "incarnation": me.incarnation, "signature": signature}
        return {**self._message(), "proof": proof}

    def _message(self) -> dict:
        """What this peer gossips: its own and its vouched entries, and the accusations it holds (if any)."""
        message = {"entries": [e.to_json() for e in self.table.outgoing()]}
        accusations = self.accusations.outgoing()
        if accusations:
            message["accusations"] = accusations
        return message

    def _take(self, message: dict, source: str) -> None:
        """Merge a gossip message (request or reply) from `source`: everything read is checked for
        form first, so that an invalid one (ValueError) merges nothing; strangers' entries past the
        source's tokens are dropped unread (Table.screen)."""
        entries = parse_entries(message["entries"], keep=self.table.screen(source))
        accusations = self.accusations.parse(message.get("accusations", []))
        self.table.merge(entries, source)
        self.accusations.take(accusations, self.table.me.peer_id)


def proof_message(challenge: str, peer_id: str, incarnation: int) -> bytes:
    """What a peer signs to prove it answers gossip at an address, as one life."""
    return f"layerswarm-gossip\0{challenge}\0{peer_id}\0{incarnation}".encode()


def source_of(address: str) -> str:
    """The host of a host:port address (an IPv6 host without its brackets), as a pushing peer's
    remote host is spelled."""
    host = address.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host
