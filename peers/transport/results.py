"""A step's result as it travels back (nested, or by direct return) and its failure, both
directions in one place: encoded here and decoded here, with structured failure reasons and who
reports them (signed, so that no peer can lay its report at another's door)."""

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import httpx

from inference.sampling import PositionScore
from peers.swarm.checks import finite_number
from peers.swarm.commitments import MAX_COMMITMENTS, Commitment
from peers.swarm.identity import SIGNATURE_CHARS, Identity, verify
from peers.transport.errors import CLAIM_KINDS, UNREACHABLE, WRONG_ANSWER, HopFailed
from peers.transport.frames import MAX_TOP_LOGPROBS


@dataclass(frozen=True)
class StepResult:
    tokens: list[int]  # one per sequence of the session's batch; draft + 1 for a drafted step
    logprobs: list[float]
    commitments: tuple = ()  # the hops' signed Commitments, first hop first (when the frame asked)
    shadows: tuple = ()  # the shadows' signed Commitments (peers/swarm/commitments.py)
    top: tuple | None = field(default=None, repr=False)  # the last hop's committed logits, before signing
    # with sampling.top_logprobs: per sampled token, the likeliest tokens and their logprobs
    alternatives: tuple[tuple[tuple[int, float], ...], ...] = ()
    prompt: tuple[PositionScore, ...] = ()  # a scored step's positions (StepRequest.score)
    # a step with a prefix: where the last hop's compute started (positions before it were restored)
    computed_from: int | None = None


def step_result_body(result: StepResult) -> dict:
    body = {"tokens": result.tokens, "logprobs": result.logprobs}
    if result.alternatives:
        body["top_logprobs"] = [[list(x) for x in alts] for alts in result.alternatives]
    if result.computed_from is not None:
        body["computed_from"] = result.computed_from
    if result.prompt:
        body["prompt_logprobs"] = [[p.logprob, p.rank, [list(x) for x in p.top]] for p in result.prompt]
    if result.commitments:
        body["commitments"] = [c.to_json() for c in result.commitments]
    if result.shadows:
        body["shadow_commitments"] = [c.to_json() for c in result.shadows]
    return body


def results_message(sender: str, items: list[tuple[str, dict]]) -> dict:
    """Direct return: (step id, step_result_body or step_error_body) of steps for one entry."""
    return {"from": sender, "results": [{"step_id": sid, **body} for sid, body in items]}


def step_error_body(
    message: str,
    failed_peer: str | None,
    reason: str,
    detail: str | None = None,
    reported_by: str | None = None,
    signature: str = "",
    claim: str | None = None,
) -> dict:
    """The JSON body of a failed step: which peer failed and why (a HopFailed reason), the line
    for people (`message`) and, from a HopFailed, what the failed peer said (`detail`: its
    decoder takes this, never a prefix cut off the message), who reports it (`reported_by`,
    with its `signature` of report_message) and what kind of claim it is (`claim`: a HopFailed's)."""
    error = {"message": message, "failed_peer": failed_peer, "type": reason}
    if detail is not None:
        error["detail"] = detail
    if reported_by is not None:
        error["reported_by"], error["signature"] = reported_by, signature
    if claim is not None:
        error["claim"] = claim
    return {"error": error}


def failure_body(failure: HopFailed) -> dict:
    """step_error_body of a HopFailed."""
    return step_error_body(
        failure.message,
        failure.peer_id,
        failure.reason,
        failure.detail,
        failure.reported_by,
        failure.signature,
        failure.claim,
    )


MAX_REPORTER_CHARS = 64  # a reported_by longer than this names no peer


def report_message(
    session_id: str, failed_peer: str, reason: str, reported_by: str, claim: str = UNREACHABLE
) -> bytes:
    """What a peer signs when it reports a failed step: the session (a new one after each failover:
    a report counts once), the peer it names, why, itself, and the kind of its claim (did not
    answer, or answered wrong: nobody can turn one into the other)."""
    lines = ("layerswarm failure report", session_id, failed_peer, reason, reported_by, claim)
    return "\n".join(lines).encode()


def attest(failure: HopFailed, identity: Identity, session_id: str) -> HopFailed:
    """`failure` as this peer hands it back: reported and signed by this peer, unless it carries
    the report of a peer further on (kept as it came: only its own signature speaks for it). A
    failure that came unsigned in another peer's reply is reported as that peer's wrong answer
    (it answered; it speaks for nobody else): never as this peer's own, nor as another's silence."""
    if failure.reported_by is not None:
        return failure
    me = identity.peer_id
    failure = answered_wrong(failure) if failure.answered_by and failure.answered_by != me else failure
    message = report_message(session_id, failure.peer_id, failure.reason, me, failure.claim)
    return HopFailed(
        failure.peer_id,
        failure.detail,
        failure.reason,
        reported_by=me,
        signature=identity.sign(message),
        claim=failure.claim,
    )


def answered_wrong(failure: HopFailed) -> HopFailed:
    """An unsigned failure that `failure.answered_by` answered: a wrong-answer claim against it
    (against the peer it names, where that is itself: a peer that says it failed did answer)."""
    by = failure.answered_by
    if failure.peer_id == by:
        return HopFailed(by, failure.detail, failure.reason, answered_by=by, claim=WRONG_ANSWER)
    detail = f"it answered an unsigned report that peer {failure.peer_id} failed: {failure.detail}"
    return HopFailed(by, detail, "failed", answered_by=by, claim=WRONG_ANSWER)


def reporter_of(
    failure: HopFailed, session_id: str, public_key_of: Callable[[str], str | None]
) -> str | None:
    """Who reports `failure`: the peer it says reported it, if that peer signed it for this
    session; else the peer whose reply carried it (a reporter speaks only for itself), or
    UNKNOWN_SENDER where a results message carried it; None where this peer found it itself."""
    by = failure.reported_by
    key = public_key_of(by) if by is not None else None
    message = (
        report_message(session_id, failure.peer_id, failure.reason, by, failure.claim)
        if by is not None
        else b""
    )
    if key and verify(key, failure.signature, message):
        return by
    return failure.answered_by


def parse_steps_reply(r: httpx.Response, peer_id: str, count: int) -> list[StepResult | HopFailed]:
    """One result per frame; a reply that is not a list of `count` results fails them all."""
    if r.status_code != 200:
        try:
            parse_step_reply(r, peer_id)
        except HopFailed as e:
            return [e] * count
    try:
        items = r.json()["results"]
        if not isinstance(items, list) or len(items) != count:
            raise ValueError(f"{count} results expected")
    except (ValueError, KeyError, TypeError) as e:
        return [
            HopFailed(peer_id, f"a steps reply that does not fit its message: {e}", claim=WRONG_ANSWER)
        ] * count
    return [_outcome(item, peer_id, peer_id) for item in items]


ACCEPTED = StepResult([], [])  # a step returned directly, checked and taken on by the next hop
UNKNOWN_SENDER = ""  # who carried a failure in a results message, as far as this peer can tell


def outcome_of(item, peer_id: str) -> StepResult | HopFailed:
    """One step's result, or its failure, from a results message that says it comes from
    `peer_id` (direct return): nothing proves that it does, so a failure names its reporter only
    by its own signature (reporter_of gives UNKNOWN_SENDER for one without)."""
    return _outcome(item, peer_id, UNKNOWN_SENDER)


def _outcome(item, peer_id: str, answered_by: str) -> StepResult | HopFailed:
    try:
        status = 200 if isinstance(item, dict) and "error" not in item else 502
        return _parse(item, status, peer_id, answered_by)
    except HopFailed as e:
        return e


def parse_step_reply(r: httpx.Response, peer_id: str) -> StepResult:
    try:
        data = r.json()
    except ValueError:
        raise HopFailed(
            peer_id, f"status {r.status_code} with a body that is not JSON", claim=WRONG_ANSWER
        ) from None
    return _parse(data, r.status_code, peer_id, peer_id)


def _parse(data, status: int, peer_id: str, answered_by: str) -> StepResult:
    if status != 200:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        err = err if isinstance(err, dict) else {"message": str(err)}
        failed = str(err.get("failed_peer") or peer_id)
        reason = err.get("type") if err.get("type") in HopFailed.REASONS else "failed"
        detail = err.get("detail")
        if not isinstance(detail, str):  # (a body without the bare reason: its whole message)
            detail = str(err.get("message", f"status {status}"))
        by, signature = err.get("reported_by"), err.get("signature")
        by = by if isinstance(by, str) and 0 < len(by) <= MAX_REPORTER_CHARS else None
        signature = signature if isinstance(signature, str) and len(signature) == SIGNATURE_CHARS else ""
        claim = err.get("claim") if err.get("claim") in CLAIM_KINDS else UNREACHABLE
        raise HopFailed(
            failed, detail, reason, reported_by=by, signature=signature, answered_by=answered_by, claim=claim
        )
    if isinstance(data, dict) and data.get("accepted") is True:
        return ACCEPTED
    try:
        result = StepResult([int(t) for t in data["tokens"]], [float(x) for x in data["logprobs"]])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise HopFailed(peer_id, "a step reply without tokens", claim=WRONG_ANSWER) from None
    try:
        result = replace(result, alternatives=_alternatives(data.get("top_logprobs"), len(result.tokens)))
    except (TypeError, ValueError) as e:
        raise HopFailed(peer_id, f"a step reply with bad top_logprobs: {e}", claim=WRONG_ANSWER) from None
    start = data.get("computed_from")
    if start is not None and (type(start) is not int or start < 0):
        raise HopFailed(peer_id, f"a step reply with a bad computed_from {start!r:.40}", claim=WRONG_ANSWER)
    try:
        result = replace(result, prompt=_prompt_scores(data.get("prompt_logprobs")), computed_from=start)
    except (TypeError, ValueError) as e:
        raise HopFailed(peer_id, f"a step reply with bad prompt_logprobs: {e}", claim=WRONG_ANSWER) from None
    try:
        found = {}
        for key in ("commitments", "shadow_commitments"):
            items = data.get(key, [])
            if not isinstance(items, list) or len(items) > MAX_COMMITMENTS:
                raise ValueError(f"{key} must be a list of at most {MAX_COMMITMENTS}")
            found[key] = tuple(Commitment.from_json(c) for c in items)
        result = replace(result, commitments=found["commitments"], shadows=found["shadow_commitments"])
    except ValueError as e:
        raise HopFailed(peer_id, f"a step reply with bad commitments: {e}", claim=WRONG_ANSWER) from None
    if (not result.tokens and not result.commitments) or len(result.tokens) != len(result.logprobs):
        raise HopFailed(
            peer_id,
            f"a step reply with {len(result.tokens)} tokens and {len(result.logprobs)} logprobs",
            claim=WRONG_ANSWER,
        )
    return result


def _alternatives(data, tokens: int) -> tuple:
    """A reply's top_logprobs: per sampled token, at most MAX_TOP_LOGPROBS [token, logprob] pairs."""
    if data is None:
        return ()
    if not isinstance(data, list) or len(data) != tokens:
        raise ValueError(f"one list per sampled token ({tokens}) expected")
    return tuple(_pairs(alts) for alts in data)


def _pairs(alts) -> tuple[tuple[int, float], ...]:
    if not isinstance(alts, list) or len(alts) > MAX_TOP_LOGPROBS:
        raise ValueError(f"at most {MAX_TOP_LOGPROBS} alternatives per token")
    pairs = []
    for pair in alts:
        if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int and pair[0] >= 0):
            raise ValueError(f"alternatives are [token, logprob] pairs, got {pair!r:.60}")
        pairs.append((pair[0], _logprob(pair[1])))
    return tuple(pairs)


def _logprob(value) -> float:
    if not finite_number(value) or value > 0:
        raise ValueError(f"a logprob is a finite number <= 0, got {value!r:.60}")
    return float(value)


def _prompt_scores(data) -> tuple[PositionScore, ...]:
    """A reply's prompt_logprobs: per scored position [logprob, rank, alternatives] (the entry
    checks there is one per position it asked for)."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ValueError("a list of scored positions expected")
    out = []
    for item in data:
        if not (isinstance(item, list) and len(item) == 3 and type(item[1]) is int and item[1] >= 1):
            raise ValueError(f"a scored position is [logprob, rank >= 1, alternatives], got {item!r:.60}")
        out.append(PositionScore(_logprob(item[0]), item[1], _pairs(item[2])))
    return tuple(out)
