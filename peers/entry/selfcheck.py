"""The entry's own check of layers no other peer serves (--self-referee): where a hop of a checked
request runs a span that no replica or chain of others covers, the entry recomputes layers 0 to
its end itself on the step's token sequences and compares with the hop's signed commitment."""

import logging
import random

from peers.entry.peer import EntryPeer
from peers.entry.routes import check_rate
from peers.entry.runner import boundaries
from peers.swarm.commitments import agree
from peers.swarm.routing import unchecked_hops
from peers.transport.errors import SwarmUnavailable
from peers.transport.frames import Hop
from peers.transport.results import StepResult

log = logging.getLogger("layerswarm.verify")


class SelfCheck:
    """Which lone hops of the current route this entry recomputes (each drawn at the check rate
    when the route is first seen, as shadows are), and the check itself."""

    def __init__(self, node: EntryPeer):
        self.node = node
        self.route: tuple[Hop, ...] = ()
        self.drawn: list[Hop] = []

    def hops(self, route: list[Hop]) -> list[Hop]:
        """The lone hops of `route` to recompute (none without --self-referee)."""
        node = self.node
        if not node.config.self_referee:
            return []
        if tuple(route) != self.route:
            self.route = tuple(route)
            peers = node.table.serving(node.model_id)
            lone = [h for h in unchecked_hops(peers, route, node.total_layers) if h.peer_id != node.peer_id]
            rate = check_rate(node)
            self.drawn = [h for h in lone if random.random() < rate]
        return self.drawn

    async def check(self, route: list[Hop], result: StepResult, rows: list[list[int]]) -> bool:
        """Recompute the last end of the drawn lone hops on `rows` (the sequences the step
        continued; agreement there vouches for every layer before it): True when it agrees.
        Otherwise the first hop, of those nothing else checked, whose end disagrees is convicted
        (the layers before it agreed), and False: the step is computed again without it."""
        drawn = self.hops(route)
        if not drawn:
            return True
        committed, me = boundaries(result), self.node.peer_id
        end = max(h.end for h in drawn)
        if self._agrees(await self.node.judge(rows, end), committed.get(end)):
            return True
        shadowed = {(s.start, s.end) for s in result.shadows}
        suspects = [
            h for h in route if h.start < end and h.peer_id != me and (h.start, h.end) not in shadowed
        ]
        for hop in suspects:
            if hop.end == end or not self._agrees(
                await self.node.judge(rows, hop.end), committed.get(hop.end)
            ):
                self.node.convict(
                    hop.peer_id,
                    f"its layers {hop.start}:{hop.end} disagreed with this entry's own computation "
                    "(no other peer serves them all)",
                )
                return False
        raise SwarmUnavailable(f"verification failed: layers 0:{end} computed here disagree with the route's")

    @staticmethod
    def _agrees(mine, theirs) -> bool:
        return theirs is not None and agree(mine, theirs)
