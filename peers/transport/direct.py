"""Direct return: the last peer of a route sends a step's result straight to the entry, and no
hop waits for the rest of the route. Each hop acknowledges a frame once it has checked it, then
computes and hands it on; a hop that sees a failure (its own, or a next hop refusing or
unreachable) reports it to the entry, naming the peer at fault.

The entry keeps a Pending for each step in flight and waits for its result. A peer that dies or
freezes after acknowledging reports nothing, so the entry, once a step is late (a few times
its recent step time), asks every hop of the route how far the step got (`Progress`): the
first hop that does not answer, or that never received what the hop before it handed on, is
the one that failed. Failure detection stays deadline-based and names the failed peer."""

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import httpx

from peers.transport.errors import HopFailed
from peers.transport.frames import PATH_PROGRESS, Hop
from peers.transport.results import StepResult

log = logging.getLogger("layerswarm.direct")

QUEUED, DONE, FAILED, UNKNOWN = "queued", "done", "failed", "unknown"
MAX_PROGRESS = 65536  # step ids a hop remembers
MIN_LATE_S = 0.25  # a step is late after this, or LATE_FACTOR x the recent step time if longer
LATE_FACTOR = 3.0
MAX_PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 1.0


class Progress:
    """How far each step that reached this hop got: queued (checked, acknowledged), done
    (computed and handed on, or its result sent), failed. Bounded, oldest forgotten first."""

    def __init__(self, size: int = MAX_PROGRESS):
        self._states: OrderedDict[str, str] = OrderedDict()
        self._size = size

    def mark(self, step_id: str, state: str) -> None:
        self._states[step_id] = state
        self._states.move_to_end(step_id)
        while len(self._states) > self._size:
            self._states.popitem(last=False)

    def state(self, step_id: str) -> str:
        return self._states.get(step_id, UNKNOWN)


@dataclass
class Pending:
    """A step this entry waits for."""

    route: list[Hop]
    future: asyncio.Future
    started: float = field(default_factory=time.monotonic)


class Returns:
    """The entry's steps in flight, by step id, and what a result must satisfy to be taken."""

    def __init__(self):
        self._pending: dict[str, Pending] = {}
        self.step_s = 0.0  # recent time from sending a step to its result (an average)
        self.taken = 0  # results and failures taken for steps in flight
        self.ignored = 0  # results for no step in flight here, or from a peer off its route
        self.probes = 0  # progress probes sent for late steps

    def __len__(self) -> int:
        return len(self._pending)

    def to_json(self) -> dict:
        """The steps in flight and what became of their results (a section of /health)."""
        return {
            "in_flight": len(self),
            "mean_step_ms": round(1000 * self.step_s, 2),
            "late_step_probes": self.probes,
            "results_taken": self.taken,
            "results_ignored": self.ignored,
        }

    def expect(self, step_id: str, route: list[Hop]) -> Pending:
        pending = Pending(route, asyncio.get_running_loop().create_future())
        self._pending[step_id] = pending
        return pending

    def discard(self, step_id: str) -> None:
        self._pending.pop(step_id, None)

    def deliver(self, sender: str, step_id: str, outcome: StepResult | HopFailed) -> bool:
        """A result (from the route's last peer) or a failure (from a hop of the route, naming a
        peer of it) for a step in flight; anything else is ignored."""
        pending = self._pending.get(step_id)
        on_route = {h.peer_id for h in pending.route} if pending else set()
        if pending is None or pending.future.done() or sender not in on_route:
            self.ignored += 1
            return False
        if isinstance(outcome, HopFailed):
            if outcome.peer_id not in on_route:  # a hop can only blame a peer of the route
                outcome = HopFailed(
                    sender,
                    outcome.detail,
                    outcome.reason,
                    answered_by=outcome.answered_by,
                    claim=outcome.claim,
                )
            pending.future.set_exception(outcome)
            pending.future.exception()  # (retrieved: a step given up on logs no warning)
        elif sender != pending.route[-1].peer_id:
            self.ignored += 1
            return False
        else:
            elapsed = time.monotonic() - pending.started
            self.step_s = elapsed if not self.step_s else 0.8 * self.step_s + 0.2 * elapsed
            pending.future.set_result(outcome)
        self.taken += 1
        return True

    async def wait(self, step_id: str, pending: Pending, deadline_s: float, probe) -> StepResult:
        """The step's result; HopFailed naming the peer at fault if a hop reports one, if a probe
        finds one (see probe_route: unsure findings count when the next probe finds one too), or
        at the deadline (the first hop the last probe saw unfinished, else the last hop)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        late = max(MIN_LATE_S, LATE_FACTOR * self.step_s)
        suspicious = False  # the last probe found something, not for sure
        suspect: str | None = None  # the first hop the last probe saw unfinished
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    blamed = suspect or pending.route[-1].peer_id
                    raise HopFailed(blamed, f"no result within {deadline_s:.1f} s", "failed")
                try:
                    return await asyncio.wait_for(asyncio.shield(pending.future), min(late, left))
                except TimeoutError:
                    pass
                self.probes += 1
                found, sure, suspect = await probe(pending.route, step_id)
                if pending.future.done():
                    return pending.future.result()
                if found is not None:
                    if sure or suspicious:
                        raise found
                    suspicious = True  # (it may be on its way, or the hop busy: one more look)
                else:
                    suspicious = False
                late = min(2 * late, MAX_PROBE_INTERVAL_S)
        finally:
            self.discard(step_id)


async def probe_route(
    http: httpx.AsyncClient, me: str, progress: Progress, route: list[Hop], step_id: str
) -> tuple[HopFailed | None, bool, str | None]:
    """Ask every hop how far the step got: (finding, sure, suspect). The finding names the first
    hop at fault: one that refuses connections (sure), or that does not answer, never got what
    its previous hop handed on, failed without its report arriving, or is the last hop when
    every hop is done and no result came (not sure: hops are asked at once, and a busy hop may
    answer late; the next probe looks again). None while the step is on its way. The suspect is
    the first hop that has not finished the step: the one blamed at the deadline."""

    async def ask(hop: Hop) -> str | Exception:
        if hop.peer_id == me:
            return progress.state(step_id)
        try:
            r = await http.get(
                f"http://{hop.address}{PATH_PROGRESS}", params={"step": step_id}, timeout=PROBE_TIMEOUT_S
            )
            data = r.json() if r.status_code == 200 else None
            state = data.get("state") if isinstance(data, dict) else None
            return (
                state if state in (QUEUED, DONE, FAILED, UNKNOWN) else ValueError(f"status {r.status_code}")
            )
        except (httpx.HTTPError, ValueError) as e:
            return e

    states = await asyncio.gather(*(ask(h) for h in route))
    suspect = next((h.peer_id for h, state in zip(route, states, strict=True) if state != DONE), None)
    for i, (hop, state) in enumerate(zip(route, states, strict=True)):
        if isinstance(state, Exception):
            what = (
                "no answer"
                if isinstance(state, httpx.TimeoutException)
                else f"{type(state).__name__}: {state}"
            )
            found = HopFailed(hop.peer_id, f"it did not answer a probe of a late step ({what})")
            return found, isinstance(state, httpx.ConnectError), suspect  # (refused: nobody listens)
        if state == UNKNOWN and (i == 0 or states[i - 1] == DONE):
            return HopFailed(hop.peer_id, "it lost a step it had acknowledged"), False, suspect
        if state == FAILED and (i + 1 == len(route) or states[i + 1] == UNKNOWN):
            return HopFailed(hop.peer_id, "it failed a step and its report never arrived"), False, suspect
    if all(state == DONE for state in states):
        return HopFailed(route[-1].peer_id, "its result never arrived"), False, suspect
    return None, False, suspect
