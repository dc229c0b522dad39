"""The gossip loop: every interval, push-pull the whole table with a few random live peers (and
seeds not yet reached). The table itself (peers/membership.py) is pure data."""

import asyncio
import logging
import random
from collections.abc import Callable

import httpx

from .limits import post_capped
from .membership import Table, parse_entries
from .protocol import PATH_GOSSIP

log = logging.getLogger("layerswarm.gossip")


class Gossip:
    def __init__(
        self, table: Table, http: httpx.AsyncClient, seeds: list[str], before_round: Callable[[], None]
    ):
        self.table, self.http, self.seeds = table, http, seeds
        self.before_round = before_round  # the node's housekeeping: heartbeat, load, expiry

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
        if fanout_all:
            me = self.table.me.peer_id
            targets = [e.peer_id for e in self.table.live() if e.peer_id != me][:32]
        await asyncio.gather(*(self._exchange(t) for t in targets))

    async def _exchange(self, address: str) -> None:
        body = {"entries": [e.to_json() for e in self.table.entries()]}
        try:
            r = await post_capped(
                self.http, f"http://{address}{PATH_GOSSIP}", self.settings.timeout_s, json=body
            )
            r.raise_for_status()
            entries = parse_entries(r.json()["entries"])
            self.table.merge(entries)
            own = next((e for e in entries if e.peer_id == address), None)
            if own is not None:  # it answered at its address, as this life
                self.table.vouch(address, own.incarnation)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            log.debug("gossip with %s failed: %s", address, e)

    def receive(self, entries) -> list[dict]:
        """Merge a peer's gossip (ValueError, and nothing merged, if any entry is invalid)."""
        self.table.merge(parse_entries(entries))
        return [e.to_json() for e in self.table.entries()]
