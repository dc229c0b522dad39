"""A step's result and its failure, encoded and decoded in one module (peers/transport/results.py):
round trips, and blame carried as fields, never parsed out of a message."""

import httpx
import pytest

from peers.swarm.identity import Identity
from peers.transport.errors import UNREACHABLE, WRONG_ANSWER, HopFailed
from peers.transport.results import (
    ACCEPTED,
    UNKNOWN_SENDER,
    StepResult,
    attest,
    failure_body,
    outcome_of,
    parse_steps_reply,
    reporter_of,
    results_message,
    step_error_body,
    step_result_body,
)


def test_a_result_survives_its_round_trip():
    result = StepResult([5, 7], [-0.5, -1.25], alternatives=(((5, -0.5), (9, -2.0)), ((7, -1.25),)))
    assert outcome_of(step_result_body(result), "p1") == result


@pytest.mark.parametrize("reason", HopFailed.REASONS)
def test_a_failure_keeps_who_why_and_what_as_fields(reason):
    detail = "peer p1 failed: looks like a prefix but is what p1 said"  # never cut off
    failure = HopFailed("p1", detail, reason)
    outcome = outcome_of(failure_body(failure), "sender")
    assert isinstance(outcome, HopFailed)
    assert (outcome.peer_id, outcome.reason, outcome.detail) == ("p1", reason, detail)
    assert outcome.message == failure.message


def test_a_failure_without_a_detail_keeps_its_whole_message():
    body = step_error_body("bad results message", None, "bad_request")
    outcome = outcome_of(body, "sender")
    assert (outcome.peer_id, outcome.reason, outcome.detail) == (
        "sender",
        "bad_request",
        "bad results message",
    )


def test_an_unknown_reason_counts_as_failed_and_a_missing_one_too():
    assert outcome_of({"error": {"message": "x", "type": "made-up"}}, "p").reason == "failed"
    assert outcome_of({"error": "just text"}, "p").reason == "failed"


def test_results_message_and_accepted_steps():
    body = results_message("me", [("s1", step_result_body(StepResult([1], [-0.1])))])
    assert body == {"from": "me", "results": [{"step_id": "s1", "tokens": [1], "logprobs": [-0.1]}]}
    assert outcome_of({"accepted": True}, "p") is ACCEPTED


@pytest.mark.parametrize(
    "item, says",
    [
        ({"tokens": [1]}, "without tokens"),
        ({"tokens": [1], "logprobs": [-0.1, -0.2]}, "1 tokens and 2 logprobs"),
        ({"tokens": [1], "logprobs": [-0.1], "top_logprobs": [[[1, 0.5]]]}, "bad top_logprobs"),
        ({"tokens": [1], "logprobs": [-0.1], "commitments": "x"}, "bad commitments"),
    ],
)
def test_a_bad_result_is_the_senders_failure(item, says):
    outcome = outcome_of(item, "p9")
    assert isinstance(outcome, HopFailed) and outcome.peer_id == "p9" and says in outcome.detail


def test_a_last_peers_reply_with_bad_alternatives_is_its_fault():
    good = {"tokens": [5], "logprobs": [-0.5], "top_logprobs": [[[5, -0.5], [6, -1.0]]]}
    assert outcome_of(good, "p").alternatives == (((5, -0.5), (6, -1.0)),)
    for bad in (
        [[[5, -0.5]], [[6, -1.0]]],  # two lists for one token
        [[[5, 0.5]]],  # a probability above 1
        [[[5, float("nan")]]],
        [[["5", -0.5]]],
        [[[5, -0.5]] * 21],
    ):
        outcome = outcome_of({**good, "top_logprobs": bad}, "p")
        assert isinstance(outcome, HopFailed) and "top_logprobs" in outcome.detail and outcome.peer_id == "p"


# -- who reports a failure -----------------------------------------------------------------------
def keys_of(*identities: Identity):
    keys = {i.peer_id: i.public_key for i in identities}
    return keys.get


def replied(body: dict, sender: str) -> HopFailed:
    """A failure as it comes back in a steps reply from `sender` (nested: the peer that answered
    is the one this peer sent the step to)."""
    return parse_steps_reply(httpx.Response(200, json={"results": [body]}), sender, 1)[0]


def test_a_signed_report_names_its_reporter_wherever_it_travels():
    """b reports that c failed, signed; a relays it to the entry: the reporter is b, not a."""
    a, b = Identity.generate(), Identity.generate()
    report = attest(HopFailed("c", "ConnectError: refused"), b, "s1")
    assert (report.reported_by, len(report.signature)) == (b.peer_id, 86)
    relayed = attest(replied(failure_body(report), b.peer_id), a, "s1")  # a keeps b's report
    at_entry = replied(failure_body(relayed), a.peer_id)
    assert (at_entry.peer_id, at_entry.reported_by, at_entry.answered_by) == ("c", b.peer_id, a.peer_id)
    assert reporter_of(at_entry, "s1", keys_of(a, b)) == b.peer_id
    direct = outcome_of(failure_body(report), "anyone")  # by direct return: the same reporter
    assert reporter_of(direct, "s1", keys_of(a, b)) == b.peer_id


def test_a_reporter_speaks_only_for_itself():
    """A report that names a reporter without its signature for this session is the report of
    the peer whose reply carried it, and of nobody known where a results message carried it (its
    `from` proves nothing): nobody can lay a claim, or a failure of its own, at another's door."""
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    keys = keys_of(a, b, c)
    signed = attest(HopFailed("c", "refused"), b, "s1")
    forged = [
        step_error_body("x", "c", "failed", "refused", b.peer_id, ""),  # unsigned
        step_error_body("x", "c", "failed", "refused", b.peer_id, "A" * 86),  # a bad signature
        step_error_body("x", "c", "failed", "refused", c.peer_id, signed.signature),  # b's, as c's
        step_error_body("x", "c", "failed", "refused", "unknown", signed.signature),  # nobody's key
        step_error_body("x", "c", "busy", "refused", b.peer_id, signed.signature),  # another reason
        step_error_body("x", "a", "failed", "refused"),  # a failure of a's own, said by someone
    ]
    for body in forged:
        assert reporter_of(replied(body, a.peer_id), "s1", keys) == a.peer_id, body
        assert reporter_of(outcome_of(body, a.peer_id), "s1", keys) == UNKNOWN_SENDER, body
    assert reporter_of(replied(failure_body(signed), a.peer_id), "s2", keys) == a.peer_id  # another session
    assert reporter_of(replied(failure_body(signed), a.peer_id), "s1", keys) == b.peer_id


def test_a_failure_found_here_has_no_reporter_and_odd_fields_are_dropped():
    assert reporter_of(HopFailed("c", "no answer within 4.0 s"), "s1", lambda p: None) is None
    body = step_error_body("x", "c", "failed", "why", "r" * 65, "sig")  # too long an id, a short signature
    outcome = replied(body, "a")
    assert (outcome.reported_by, outcome.signature, outcome.answered_by) == (None, "", "a")
    body["error"]["reported_by"], body["error"]["signature"] = ["b"], 7  # not strings
    outcome = replied(body, "a")
    assert (outcome.reported_by, outcome.signature) == (None, "")


# -- what kind of claim a report is ------------------------------------------------------------
@pytest.mark.parametrize(
    "item",
    [
        {"tokens": [1]},
        {"tokens": [1], "logprobs": [-0.1, -0.2]},
        {"tokens": [1], "logprobs": [-0.1], "top_logprobs": [[[1, 0.5]]]},
        {"tokens": [1], "logprobs": [-0.1], "commitments": "x"},
    ],
)
def test_a_reply_that_does_not_parse_is_a_wrong_answer_of_the_peer_that_sent_it(item):
    assert replied(item, "p9").claim == WRONG_ANSWER
    not_json = parse_steps_reply(httpx.Response(502, content=b"<html>"), "p9", 1)[0]
    assert (not_json.peer_id, not_json.claim) == ("p9", WRONG_ANSWER)
    misfit = parse_steps_reply(httpx.Response(200, json={"results": "garbage"}), "p9", 2)
    assert [(f.peer_id, f.claim) for f in misfit] == [("p9", WRONG_ANSWER)] * 2


def test_a_reports_kind_travels_signed_and_cannot_be_turned():
    """b signs that c answered wrong; relayed by a, the entry reads the same kind from b; the
    same report relabelled 'unreachable' (so that a liveness check of c would ban b) or
    unlabelled is nobody's signed report: the peer whose reply carried it is its reporter."""
    a, b = Identity.generate(), Identity.generate()
    keys = keys_of(a, b)
    report = attest(HopFailed("c", "a step reply without tokens", claim=WRONG_ANSWER), b, "s1")
    assert failure_body(report)["error"]["claim"] == WRONG_ANSWER
    relayed = attest(replied(failure_body(report), b.peer_id), a, "s1")
    at_entry = replied(failure_body(relayed), a.peer_id)
    assert (at_entry.claim, reporter_of(at_entry, "s1", keys)) == (WRONG_ANSWER, b.peer_id)
    turned = failure_body(report)
    turned["error"]["claim"] = UNREACHABLE
    assert reporter_of(replied(turned, a.peer_id), "s1", keys) == a.peer_id
    del turned["error"]["claim"]  # (a body without it is an 'unreachable' one)
    assert replied(turned, a.peer_id).claim == UNREACHABLE
    assert reporter_of(replied(turned, a.peer_id), "s1", keys) == a.peer_id
    turned["error"]["claim"] = "whatever"
    assert replied(turned, a.peer_id).claim == UNREACHABLE


def test_an_unsigned_failure_in_a_reply_is_reported_as_that_peers_wrong_answer():
    """c answers b with an unsigned failure: of c itself, or naming a, b or d. b reports c's
    wrong answer (c is alive: it answered), never b's own failure, nor another peer's silence."""
    b = Identity.generate()
    for named in ("c", "a", b.peer_id, "d"):
        body = step_error_body("x", named, "failed", "refused")
        report = attest(replied(body, "c"), b, "s1")
        assert (report.peer_id, report.claim, report.reported_by) == ("c", WRONG_ANSWER, b.peer_id), named
        assert reporter_of(report, "s1", keys_of(b)) == b.peer_id
    busy = attest(replied(step_error_body("x", "c", "busy", "no room"), "c"), b, "s1")
    assert (busy.peer_id, busy.reason) == ("c", "busy")  # (a peer without room is no claim)
    own = attest(HopFailed(b.peer_id, "CUDA error"), b, "s1")  # found here: as it was
    assert (own.peer_id, own.claim) == (b.peer_id, UNREACHABLE)
