"""A step's result and its failure, encoded and decoded in one module (peers/transport/results.py):
round trips, and blame carried as fields, never parsed out of a message."""

import httpx
import pytest

from peers.swarm.identity import Identity
from peers.transport.errors import HopFailed
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
