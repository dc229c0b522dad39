"""Whom an entry avoids, and why: failure accounting in one place. A peer at fault is banned (doubling
per repeat; lifted by a success through it or a new life of it); a convicted one for a fixed time
across lives; a busy or full peer is not at fault; a report that another peer failed is a claim,
believed only once checked: the peer whose claims do not hold up is the one avoided. A claim that
a peer answered wrong is believed only corroborated (two reporters), and its reporter disbelieved
where it is the common factor (two peers named)."""

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from peers.swarm.commitments import VerificationStats
from peers.swarm.membership import Table

log = logging.getLogger("layerswarm.peer")

MAX_CONVICTED = 4096
SHOWN_CONVICTED = 64  # the latest convictions, with why, kept for /health
AT_FAULT = "failed"  # the one failure reason that bans (see HopFailed.REASONS)
MESSAGE_CHARS = 300  # of a failure's message, kept in the log
CLAIM_HOLD_S = 5.0  # the longest an unsettled claim keeps its two peers out of routes
MAX_CLAIMANTS = 4096  # reporters whose false claims are remembered (the oldest forgotten first)
UNREACHABLE, WRONG_ANSWER, STALLED = (
    "unreachable",
    "wrong_answer",
    "stalled",
)  # a claim's kinds (HopFailed.claim)
WRONG_ANSWER_WINDOW_S = 600.0  # how long a wrong-answer claim counts, and softly avoids its peers
CORROBORATED = 2  # distinct reporters against one peer (or peers named by one reporter) that ban
MAX_WRONG_ANSWERS = 4096  # wrong-answer claims kept (reporter, named), the oldest forgotten first
SHOWN_SUSPECTS = 64  # of the peers softly avoided, in /health


@dataclass
class _Ban:
    until: float
    strikes: int
    incarnation: int


class Bans:
    def __init__(self, first_s: float, max_s: float, clock=time.monotonic):
        self.first_s, self.max_s, self.clock = first_s, max_s, clock
        self._bans: dict[str, _Ban] = {}
        self._convicted: dict[str, float] = {}  # peer -> until

    def ban(self, peer_id: str, incarnation: int) -> float:
        now = self.clock()
        for p in [p for p, b in self._bans.items() if b.until + self.max_s < now]:
            del self._bans[p]  # long expired: its strikes are forgiven (keeps the map bounded)
        old = self._bans.get(peer_id)
        strikes = old.strikes + 1 if old and old.incarnation == incarnation else 1
        duration = min(self.max_s, self.first_s * 2 ** (strikes - 1))
        self._bans[peer_id] = _Ban(now + duration, strikes, incarnation)
        return duration

    def convict(self, peer_id: str, duration_s: float) -> None:
        """Ban for `duration_s`, across lives (a liar restarting is still a liar)."""
        self._convicted[peer_id] = max(self._convicted.get(peer_id, 0.0), self.clock() + duration_s)
        if len(self._convicted) > MAX_CONVICTED:  # forget the convictions that end first
            for p in sorted(self._convicted, key=self._convicted.get)[: len(self._convicted) - MAX_CONVICTED]:
                del self._convicted[p]

    def convicted(self, peer_id: str) -> bool:
        return self._convicted.get(peer_id, 0.0) > self.clock()

    def banned(self, incarnations: dict[str, int]) -> set[str]:
        now = self.clock()
        return {
            p
            for p, b in self._bans.items()
            if b.until > now and incarnations.get(p, b.incarnation) == b.incarnation
        } | {p for p, until in self._convicted.items() if until > now}

    def proven(self, peer_id: str) -> None:
        self._bans.pop(peer_id, None)


@dataclass(frozen=True)
class Claim:
    """`reporter` says that `named` failed (a HopFailed `reason` and its `message`): it did not
    answer (UNREACHABLE: a liveness check decides) or answered wrong (WRONG_ANSWER: alive by
    construction, so only corroboration decides)."""

    reporter: str  # "" where nothing says who (an unsigned report that came by direct return)
    named: str
    reason: str
    message: str
    kind: str = UNREACHABLE


class Claims:
    """Claims being checked (both of their peers held out of routes meanwhile, at most
    CLAIM_HOLD_S) and each reporter's false claims so far (kept across its lives and successes:
    a false claim is a lie, not a failure); and the wrong-answer claims of the last
    WRONG_ANSWER_WINDOW_S, whose peers are softly avoided and counted (see wrong_answer)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._open: dict[tuple[str, str], float] = {}  # (reporter, named) -> held until
        self.false: OrderedDict[str, int] = OrderedDict()  # reporter -> false claims
        self.upheld = self.refuted = 0
        self._wrong: OrderedDict[tuple[str, str], float] = OrderedDict()  # (reporter, named) -> when
        self.wrong_answers = 0  # wrong-answer claims counted

    def open(self, claim: Claim) -> bool:
        """Hold the claim's two peers out of routes until it is settled; False where the same
        claim is being checked already (one check answers both)."""
        key = (claim.reporter, claim.named)
        if key in self._checking():
            return False
        self._open[key] = self.clock() + CLAIM_HOLD_S
        return True

    def held(self) -> set[str]:
        """The peers of the claims being checked."""
        return {p for key in self._checking() for p in key}

    def _checking(self) -> dict[tuple[str, str], float]:
        now = self.clock()
        for key in [key for key, until in self._open.items() if until <= now]:
            del self._open[key]  # (a check that never came back)
        return self._open

    def close(self, claim: Claim) -> None:
        """The check of `claim` settled nothing (see Reputation.claim_unsettled)."""
        self._open.pop((claim.reporter, claim.named), None)

    def settle(self, claim: Claim, held_up: bool) -> int:
        """The check's verdict; returns the reporter's false claims so far."""
        self._open.pop((claim.reporter, claim.named), None)
        if held_up:
            self.upheld += 1
            return self.false.get(claim.reporter, 0)
        self.refuted += 1
        return self.lied(claim.reporter) if claim.reporter else 0

    def lied(self, reporter: str) -> int:
        """One more false claim of `reporter`; returns its false claims so far."""
        self.false[reporter] = self.false.pop(reporter, 0) + 1
        while len(self.false) > MAX_CLAIMANTS:
            self.false.popitem(last=False)
        return self.false[reporter]

    def wrong_answer(self, claim: Claim) -> list[str]:
        """Count a signed wrong-answer claim; returns who it now shows at fault: the named peer
        once CORROBORATED distinct reporters claim against it, the reporter once its claims name
        CORROBORATED distinct peers (the common factor). Those are forgotten here (settled)."""
        if not claim.reporter:  # (nobody to hold to it: it counts for nothing)
            return []
        wrong = self._recent()
        key = (claim.reporter, claim.named)
        wrong.pop(key, None)
        wrong[key] = self.clock()
        self.wrong_answers += 1
        while len(wrong) > MAX_WRONG_ANSWERS:
            wrong.popitem(last=False)
        at_fault = []
        if len({r for r, n in wrong if n == claim.named}) >= CORROBORATED:
            at_fault.append(claim.named)
        if len({n for r, n in wrong if r == claim.reporter}) >= CORROBORATED:
            at_fault.append(claim.reporter)
        for key in [key for key in wrong if set(key) & set(at_fault)]:
            del wrong[key]  # (settled: neither counts for, nor against, anyone any more)
        return at_fault

    def suspected(self) -> set[str]:
        """The peers of the wrong-answer claims of the window: routes avoid them where the swarm
        allows (one of each pair lied, and nothing yet says which)."""
        return {p for key in self._recent() for p in key}

    def _recent(self) -> OrderedDict[tuple[str, str], float]:
        since = self.clock() - WRONG_ANSWER_WINDOW_S
        while self._wrong and next(iter(self._wrong.values())) < since:
            self._wrong.popitem(last=False)  # (kept in the order they came: the oldest first)
        return self._wrong

    def to_json(self) -> dict:
        """Claims checked, and how they ended; wrong-answer claims counted, and the peers that
        they have routes avoid now."""
        return {
            "checking": len(self._checking()),
            "upheld": self.upheld,
            "refuted": self.refuted,
            "wrong_answers": self.wrong_answers,
            "suspected": sorted(self.suspected())[:SHOWN_SUSPECTS],
        }


class Reputation:
    """An entry's failure accounting (Petals' sequence manager's `on_request_failure` and
    `on_request_success`): every failed hop is counted and logged; a peer at fault is banned and
    reported to the table; a success through peers lifts their bans. Retries and backoff are
    the caller's (the entry's generation loop)."""

    def __init__(
        self,
        bans: Bans,
        table: Table,
        log: deque[dict],
        count: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        verification: VerificationStats | None = None,
    ):
        """`log`: the latest failures (for the swarm page); `count(reason)`: called once per
        failure (the peer's failover counters); `verification`: where convictions are shown."""
        self.bans, self.table, self.log, self.count, self.clock = bans, table, log, count, clock
        self.verification = verification if verification is not None else VerificationStats()
        self.claims = Claims(bans.clock)

    def convict(self, peer_id: str, seconds: float, why: str) -> None:
        """A peer computed wrong (outvoted, or accused with evidence): avoid it for `seconds`, any
        life; keep why among the latest convictions and log it with its address."""
        self.bans.convict(peer_id, seconds)
        convicted = self.verification.convicted
        convicted[peer_id] = why
        while len(convicted) > SHOWN_CONVICTED:
            del convicted[next(iter(convicted))]
        entry = self.table.get(peer_id)
        address = entry.address if entry else "?"
        log.warning("peer %s (%s) convicted: %s; avoided for %.0f s", peer_id, address, why, seconds)

    def banned_now(self) -> set[str]:
        """The peers to route around now: banned in their current life, convicted, or concerned
        by a claim being checked."""
        incarnations = {e.peer_id: e.incarnation for e in self.table.live()}
        return self.bans.banned(incarnations) | self.claims.held()

    def on_request_failure(self, peer_id: str, reason: str, message: str) -> float | None:
        """A hop through `peer_id` failed for `reason`: count and log it; ban the peer if it is at
        fault. Returns the ban's duration in seconds, or None where nobody is banned."""
        self._record(peer_id, reason, message)
        return self._ban(peer_id) if reason == AT_FAULT else None

    def on_claim(self, claim: Claim) -> bool:
        """A peer reports that another failed: count and log it, ban nobody yet, hold both out
        of routes; True where the named peer is to be checked (see claim_settled)."""
        self._record(claim.named, claim.reason, claim.message, claim.reporter)
        return self.claims.open(claim)

    def claim_settled(self, claim: Claim, held_up: bool) -> tuple[str, float]:
        """The check of `claim`'s named peer is done: if the claim held up (the peer did not
        answer), the named peer is banned as if this entry had seen it fail; if not, its reporter
        is avoided, across lives, for ban_s doubling with each of its false claims. Returns
        (who is avoided, for how many seconds)."""
        false_claims = self.claims.settle(claim, held_up)
        if held_up:
            return claim.named, self._ban(claim.named)
        if not claim.reporter:  # (an unsigned report in a results message: nobody to hold to it)
            log.warning("an unsigned report that peer %s failed, but it answers: nobody banned", claim.named)
            return "", 0.0
        seconds = min(self.bans.max_s, self.bans.first_s * 2 ** min(false_claims - 1, 32))
        self.bans.convict(claim.reporter, seconds)
        log.warning(
            "peer %s reported that peer %s failed, but %s answers: a false claim (%d so far); "
            "peer %s banned for %.1f s",
            claim.reporter,
            claim.named,
            claim.named,
            false_claims,
            claim.reporter,
            seconds,
        )
        return claim.reporter, seconds

    def claim_unsettled(self, claim: Claim) -> list[tuple[str, float]]:
        """A STALLED claim whose named peer answers the liveness check: either peer may have held
        the step up, so the claim counts as a wrong-answer claim (corroboration decides), and
        neither is banned on its word alone."""
        self.claims.close(claim)
        return self.on_wrong_answer(claim)

    def on_wrong_answer(self, claim: Claim) -> list[tuple[str, float]]:
        """A peer reports that another answered wrong: count and log it, ban nobody on its word
        alone (both are softly avoided for WRONG_ANSWER_WINDOW_S: see suspected); a peer claimed
        against by CORROBORATED reporters is banned as if this entry had seen it fail, a reporter
        whose claims name CORROBORATED peers is avoided across lives like a false claimant.
        Returns (who is banned, for how many seconds)."""
        self._record(claim.named, claim.reason, claim.message, claim.reporter)
        banned = []
        for peer in self.claims.wrong_answer(claim):
            if peer == claim.named:
                seconds, why = self._ban(peer), f"{CORROBORATED} peers report that it answered wrong"
            else:
                false_claims = self.claims.lied(peer)
                seconds = min(self.bans.max_s, self.bans.first_s * 2 ** min(false_claims - 1, 32))
                self.bans.convict(peer, seconds)
                why = f"it reports that {CORROBORATED} different peers answered wrong (the common factor)"
            log.warning("peer %s banned for %.1f s: %s", peer, seconds, why)
            banned.append((peer, seconds))
        return banned

    def suspected(self) -> set[str]:
        """The peers that routes avoid where the swarm allows (see Claims.suspected)."""
        return self.claims.suspected()

    def _record(self, peer_id: str, reason: str, message: str, reported_by: str | None = None) -> None:
        if self.count is not None:
            self.count(reason)
        line = {"at": self.clock(), "peer_id": peer_id, "reason": reason, "message": message[:MESSAGE_CHARS]}
        if reported_by is not None:
            line["reported_by"] = reported_by
        self.log.append(line)

    def _ban(self, peer_id: str) -> float:
        entry = next((x for x in self.table.live() if x.peer_id == peer_id), None)
        duration = self.bans.ban(peer_id, entry.incarnation if entry else 0)
        self.table.report_failure(peer_id)
        return duration

    def on_request_success(self, peer_ids: Iterable[str]) -> None:
        """A step went through these peers after a failure: their bans are lifted."""
        for peer_id in peer_ids:
            self.bans.proven(peer_id)
