"""Routes for one request, read from the entry's table: the route around the peers to avoid, the
shadows that recompute a route's hops (each drawn at the entry's rate) and the seals that tell
each hop, and it alone, which shadow it feeds; and the entry's Reputation (whom to avoid)."""

import random

from peers.entry.peer import EntryPeer
from peers.entry.prefix import routing_key
from peers.swarm.routing import NoRouteError, plan_route, unchecked_hops, weight
from peers.swarm.seals import blank_seal, seal
from peers.transport.frames import MAX_SHADOWS, Hop


def current_route(node: EntryPeer, key: str, exclude: set[str]) -> list[Hop]:
    """The route for routing key `key` around the peers in `exclude` (NoRouteError: none). In an
    open swarm (no swarm key) hops that others could recompute come first (plan_route's
    checkable_first)."""
    peers = node.table.serving(node.model_id)
    open_swarm = node.config.swarm_key is None
    return plan_route(
        peers,
        node.total_layers,
        key,
        node.model_id,
        exclude,
        origin=node.table.me,
        checkable_first=open_swarm,
    )


def banned_now(node: EntryPeer) -> set[str]:
    """The peers this entry routes around now (banned or convicted)."""
    return node.reputation.banned_now()


def route_around(
    node: EntryPeer, key: str, exclude: set[str], avoid: frozenset[str], strict: bool
) -> list[Hop]:
    """A route around `exclude`, and around as many of the peers in `avoid` as the swarm allows
    (all of them, with `strict`)."""
    if strict or not avoid:
        return current_route(node, key, exclude | avoid)
    excluded = set(exclude)
    current_route(node, key, excluded)  # NoRouteError: none at all
    for peer in sorted(avoid):
        try:
            current_route(node, key, excluded | {peer})
            excluded.add(peer)
        except NoRouteError:
            continue  # no route without it: keep it
    return current_route(node, key, excluded)


def planned_route(node: EntryPeer, key: str, avoid: set[str]) -> list[Hop] | None:
    """The route a generation avoiding `avoid` would take now (None: no route at all)."""
    try:
        return route_around(node, key, banned_now(node), frozenset(avoid), strict=False)
    except NoRouteError:
        return None


def check_rate(node: EntryPeer) -> float:
    """The chance that each replicated hop of a checked request is shadowed: --verify-rate, or
    every hop where the entry checks nothing by itself (a request checked on purpose)."""
    return node.config.verify_rate or 1.0


def shadows_for(
    node: EntryPeer, key: str, route: list[Hop], exclude: set[str], rate: float = 1.0
) -> tuple[Hop, ...]:
    """For each hop, a replica off the route that serves its layers, chosen by rendezvous hashing
    on the request's key (none where the swarm has no other); each kept with chance `rate`,
    drawn for each hop on its own, so that whether one hop is checked says nothing of another."""
    on_route = {h.peer_id for h in route}
    peers = [p for p in node.table.serving(node.model_id) if p.peer_id not in on_route | exclude]
    shadows = []
    for hop in route:
        fits = [p for p in peers if p.start <= hop.start and hop.end <= p.end]
        if fits:  # one hop per shadow: a session is one run of layers on each peer
            best = max(fits, key=lambda p: weight(key, p.peer_id))
            peers.remove(best)
            if rate >= 1 or random.random() < rate:
                shadows.append(Hop(best.peer_id, best.address, hop.start, hop.end))
    return tuple(shadows[:MAX_SHADOWS])


def seals_for(node: EntryPeer, route: list[Hop], shadows: tuple[Hop, ...]) -> tuple[str, ...]:
    """One seal per hop (StepRequest.seals): hop i's names the shadow of hop i + 1, sealed to hop
    i's key; the others (and one to a hop whose key this entry lacks) are random bytes of the same
    length. The first hop's shadow is fed by the entry itself."""
    by_span = {(s.start, s.end): s for s in shadows}
    seals = []
    for hop, nxt in zip(route, [*route[1:], None], strict=True):
        shadow = by_span.get((nxt.start, nxt.end)) if nxt is not None else None
        entry = node.table.get(hop.peer_id) if shadow is not None else None
        if entry is not None and entry.seal_key:
            seals.append(seal(entry.seal_key, shadow.peer_id.encode()))
        else:
            seals.append(blank_seal())
    return tuple(seals)


def unshadowed(node: EntryPeer, key: str, route: list[Hop], exclude: set[str]) -> list[Hop]:
    """The hops of `route` that no single replica can shadow but a chain of other peers covers:
    checking them takes a second route (consensus of two) rather than shadows."""
    shadowed = {(s.start, s.end) for s in shadows_for(node, key, route, exclude)}
    peers = [p for p in node.table.serving(node.model_id) if p.peer_id not in exclude]
    alone = {h.peer_id for h in unchecked_hops(peers, route, node.total_layers)}
    return [h for h in route if (h.start, h.end) not in shadowed and h.peer_id not in alone]


def checked_by_a_second_route(node: EntryPeer, prompt_ids: list[int]) -> bool:
    """Whether a checked request of this prompt runs on a second route: its route has a hop that
    no single replica can shadow but a chain of other peers covers (a peer announcing a long
    span is recomputed by the peers of shorter ones), drawn at the entry's rate."""
    if random.random() >= check_rate(node):  # (the long hop is checked at the rate, as any)
        return False
    key = routing_key(prompt_ids)
    exclude = banned_now(node)
    route = planned_route(node, key, set())
    return route is not None and bool(unshadowed(node, key, route, exclude))


def unchecked_layers(node: EntryPeer, route: list[Hop]) -> list[tuple[int, int]]:
    """The spans of `route` that no other serving peer (nor chain of them) could recompute: no
    check of this entry's can cover them but its own (--self-referee)."""
    peers = node.table.serving(node.model_id)
    return [(h.start, h.end) for h in unchecked_hops(peers, route, node.total_layers)]


def peers_of(route: list[Hop]) -> set[str]:
    return {h.peer_id for h in route}
