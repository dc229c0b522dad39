"""Route planning, pure: a chain of peers whose spans tile [0, L) in order, fewest hops first,
then rendezvous (highest-random-weight) hashing with xxhash on the session key, skipping peers
over a bounded load."""

from collections.abc import Iterable, Sequence

import xxhash

from .membership import PeerEntry
from .protocol import Hop

LOAD_BOUND = 1.25  # a peer above this times the mean load of its candidates is skipped


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


def coverage(peers: Iterable[PeerEntry], total: int) -> list[int]:
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


def plan_route(
    peers: Sequence[PeerEntry], total: int, key: str, model: str = "", exclude: Iterable[str] = ()
) -> list[Hop]:
    """Hops tiling [0, total). A hop may start inside a peer's span (it runs the rest of it)."""
    excluded = set(exclude)
    usable = [p for p in peers if p.peer_id not in excluded and p.start < p.end]
    missing = gaps(coverage(usable, total))
    if missing:
        raise NoRouteError(model, missing)
    # hops_left[pos]: fewest hops from layer `pos` to the end, over positions a hop can start at.
    starts = sorted({0} | {p.end for p in usable if p.end < total}, reverse=True)
    hops_left = {total: 0}
    for pos in starts:
        options = [hops_left[p.end] for p in usable if p.start <= pos < p.end and p.end in hops_left]
        if options:
            hops_left[pos] = 1 + min(options)
    route, pos = [], 0
    while pos < total:
        candidates = [p for p in usable if p.start <= pos < p.end and p.end in hops_left]
        best = min(hops_left[p.end] for p in candidates)
        chosen = choose(key, [p for p in candidates if hops_left[p.end] == best])
        route.append(Hop(chosen.peer_id, chosen.address, pos, chosen.end))
        pos = chosen.end
    return route


def choose(key: str, candidates: Sequence[PeerEntry]) -> PeerEntry:
    """Rendezvous hashing among candidates, skipping those above the load bound when others can serve."""
    mean = sum(p.load for p in candidates) / len(candidates)
    light = [p for p in candidates if p.load <= LOAD_BOUND * mean + 1e-9] or list(candidates)
    return max(light, key=lambda p: weight(key, p.peer_id))
