"""Route planning, pure: a chain of peers whose spans tile [0, L) in order, fewest hops first,
then rendezvous (highest-random-weight) hashing with xxhash on the session key, skipping peers
over a bounded load, and peers whose compute or whose link from the previous hop is much slower
than another candidate's (as the peers measured and published them)."""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

from peers.swarm.membership import PeerRecord

LOAD_BOUND = 1.25  # a peer above this times the mean load of its candidates (rounded up) is skipped
SLOW_FACTOR = 2.0  # a peer whose compute and link take more than this times the best candidate's,
SLOW_MARGIN_MS = 20.0  # plus this, is skipped


@dataclass(frozen=True)
class Hop:
    """One peer of a route and the layers [start, end) it runs for this session."""

    peer_id: str
    address: str  # host:port
    start: int
    end: int


class NoRouteError(Exception):
    """No chain of serving peers covers all layers."""

    def __init__(self, model: str, missing: list[tuple[int, int]]):
        self.model, self.missing = model, missing
        gaps = ", ".join(_layers_text(a, b) for a, b in missing)
        super().__init__(f"no complete route for model {model!r}: no peer serves {gaps}")


def _layers_text(start: int, end: int) -> str:
    return f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"


def weight(key: str, peer_id: str) -> int:
    return xxhash.xxh64_intdigest(f"{key}\0{peer_id}".encode())


def coverage(peers: Iterable[PeerRecord], total: int) -> list[int]:
    """How many peers serve each layer."""
    counts = [0] * total
    for p in peers:
        for layer in range(max(p.start, 0), min(p.end, total)):
            counts[layer] += 1
    return counts


def gaps(counts: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of layers served by nobody."""
    out, start = [], None
    for layer, n in enumerate([*counts, 1]):
        if n == 0 and start is None:
            start = layer
        elif n and start is not None:
            out.append((start, layer))
            start = None
    return out


def alone(counts: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of layers exactly one peer serves: no replica or chain of others
    could recompute them, so no check of another peer covers them."""
    return gaps([0 if n == 1 else 1 for n in counts])


def plan_route(
    peers: Sequence[PeerRecord],
    total: int,
    key: str,
    model: str = "",
    exclude: Iterable[str] = (),
    origin: PeerRecord | None = None,
    checkable_first: bool = False,
) -> list[Hop]:
    """Hops tiling [0, total). A hop may start inside a peer's span (it runs the rest of it).
    `origin`: the entry planning the route (its links time the first hop). `checkable_first`
    (an open swarm): fewest layers on hops that no other peers could recompute comes before
    fewest hops, so that a stranger announcing a long span does not win routes by its length
    alone (see unchecked_from)."""
    excluded = set(exclude)
    usable = [p for p in peers if p.peer_id not in excluded and p.start < p.end]
    counts = coverage(usable, total)
    missing = gaps(counts)
    if missing:
        raise NoRouteError(model, missing)
    last_alone = unchecked_from(usable, counts) if checkable_first else {}

    def cost(p: PeerRecord, pos: int) -> tuple[int, int]:  # (layers no one else covers, hops)
        alone = p.end - pos if last_alone.get(p.peer_id, -1) >= pos else 0
        return alone, 1

    # best[pos]: the least (unchecked layers, hops) from layer `pos` to the end, over positions
    # a hop can start at.
    starts = sorted({0} | {p.end for p in usable if p.end < total}, reverse=True)
    best: dict[int, tuple[int, int]] = {total: (0, 0)}
    for pos in starts:
        options = [
            _plus(cost(p, pos), best[p.end]) for p in usable if p.start <= pos < p.end and p.end in best
        ]
        if options:
            best[pos] = min(options)
    route, pos, prev = [], 0, origin
    while pos < total:
        candidates = [p for p in usable if p.start <= pos < p.end and p.end in best]
        least = min(_plus(cost(p, pos), best[p.end]) for p in candidates)
        tied = [p for p in candidates if _plus(cost(p, pos), best[p.end]) == least]
        chosen = choose(key, tied, prev, pos, prev is origin)
        route.append(Hop(chosen.peer_id, chosen.address, pos, chosen.end))
        pos, prev = chosen.end, chosen
    return route


def _plus(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def unchecked_from(peers: Sequence[PeerRecord], counts: Sequence[int]) -> dict[str, int]:
    """For each peer, the last layer of its span that no other peer serves (-1: none): a hop of
    it from layer `pos` on can be recomputed by others (one replica or a chain of them) only
    when `pos` lies past that layer."""
    out = {}
    for p in peers:
        alone = [layer for layer in range(p.start, p.end) if counts[layer] <= 1]
        out[p.peer_id] = alone[-1] if alone else -1
    return out


def unchecked_hops(peers: Sequence[PeerRecord], route: Sequence[Hop], total: int) -> list[Hop]:
    """The hops of `route` whose layers no other peer of `peers` covers (no replica and no chain
    of others could recompute them)."""
    counts, by_id = coverage(peers, total), {p.peer_id: p for p in peers}

    def others(hop: Hop, layer: int) -> int:
        own = by_id.get(hop.peer_id)
        return counts[layer] - (own is not None and own.start <= layer < own.end)

    return [h for h in route if any(others(h, layer) == 0 for layer in range(h.start, h.end))]


def choose(
    key: str,
    candidates: Sequence[PeerRecord],
    prev: PeerRecord | None = None,
    pos: int = 0,
    mine: bool = False,
) -> PeerRecord:
    """Rendezvous hashing among candidates, skipping those above the load bound and those much
    slower than another (`fast`) when others can serve. Measurements change slowly and only a
    much slower peer is skipped, so requests with one key keep reaching the same peers."""
    mean = sum(p.load for p in candidates) / len(candidates)
    bound = math.ceil(LOAD_BOUND * mean - 1e-9)  # loads are whole sessions: one more is no imbalance
    light = [p for p in candidates if p.load <= bound] or list(candidates)
    return max(fast(light, prev, pos, mine) or light, key=lambda p: weight(key, p.peer_id))


def fast(
    candidates: Sequence[PeerRecord], prev: PeerRecord | None, pos: int, mine: bool = False
) -> list[PeerRecord]:
    """The candidates for a hop from layer `pos` that are not much slower than another: by the
    time each would take, its compute (published ms per layer x the layers it would run) plus
    its link from `prev` (see link_ms; `mine`: prev is the planner itself, and only its own
    measurement counts). What a candidate has not measured yet counts as the best of the
    others' (a new peer is not held back)."""
    compute = {p.peer_id: p.layer_ms * (p.end - pos) for p in candidates if p.layer_ms > 0}
    links = {p.peer_id: ms for p in candidates if (ms := link_ms(prev, p, mine)) is not None}
    if not compute and not links:
        return list(candidates)
    best_compute, best_link = min(compute.values(), default=0.0), min(links.values(), default=0.0)
    cost = {
        p.peer_id: compute.get(p.peer_id, best_compute) + links.get(p.peer_id, best_link) for p in candidates
    }
    limit = SLOW_FACTOR * min(cost.values()) + SLOW_MARGIN_MS
    return [p for p in candidates if cost[p.peer_id] <= limit]


def link_ms(a: PeerRecord | None, b: PeerRecord, only_a: bool = False) -> float | None:
    """The round-trip time between two peers as they published it: the larger of their two
    measurements, so that neither can make a link look shorter than the other end sees it
    (`only_a`: a's alone, a being the planner). None if neither measured it."""
    if a is None or a.peer_id == b.peer_id:
        return None
    times = [ms for pid, ms in a.links if pid == b.peer_id]
    if not only_a:
        times += [ms for pid, ms in b.links if pid == a.peer_id]
    return max(times) if times else None
