"""The entry's bans (doubling, lifted by success or by a new life of the peer) and its failure
accounting (Reputation: who is banned, reported, counted and logged, for which failure)."""

import logging
from collections import deque
from types import SimpleNamespace

from peers.swarm.commitments import VerificationStats
from peers.swarm.reputation import (
    CLAIM_HOLD_S,
    MAX_CLAIMANTS,
    MAX_WRONG_ANSWERS,
    STALLED,
    WRONG_ANSWER,
    WRONG_ANSWER_WINDOW_S,
    Bans,
    Claim,
    Reputation,
)
from tests.helpers import FakeClock


def test_ban_doubles_on_repeats_and_is_capped():
    clock = FakeClock()
    bans = Bans(first_s=1, max_s=5, clock=clock)
    assert [bans.ban("p", 1) for _ in range(5)] == [1, 2, 4, 5, 5]
    assert bans.banned({"p": 1}) == {"p"}
    clock.now = 4.9
    assert bans.banned({"p": 1}) == {"p"}
    clock.now = 5.1
    assert bans.banned({"p": 1}) == set()


def test_ban_is_lifted_by_success_or_a_new_life():
    clock = FakeClock()
    bans = Bans(first_s=10, max_s=60, clock=clock)
    bans.ban("p", 1)
    assert bans.banned({"p": 2}) == set()  # restarted: a new incarnation is not banned
    bans.proven("p")
    assert bans.banned({"p": 1}) == set()
    assert bans.ban("p", 1) == 10  # strikes start over after a success


class Table:
    """The part of membership's Table that Reputation reads and tells."""

    def __init__(self, incarnations: dict[str, int]):
        self.incarnations, self.reported = incarnations, []

    def live(self):
        return [SimpleNamespace(peer_id=p, incarnation=i) for p, i in self.incarnations.items()]

    def report_failure(self, peer_id: str) -> None:
        self.reported.append(peer_id)

    def get(self, peer_id: str):
        return SimpleNamespace(address=f"http://{peer_id}:1") if peer_id in self.incarnations else None


def reputation(clock=None, **incarnations):
    table, counted = Table(incarnations), []
    rep = Reputation(
        Bans(10, 60, clock or FakeClock()), table, deque(maxlen=2), counted.append, clock=lambda: 7.0
    )
    return rep, table, counted


def test_a_peer_at_fault_is_banned_in_its_life_and_reported():
    rep, table, counted = reputation(p=3)
    assert rep.on_request_failure("p", "failed", "peer p failed: timed out") == 10
    assert rep.banned_now() == {"p"} and table.reported == ["p"] and counted == ["failed"]
    assert list(rep.log) == [
        {"at": 7.0, "peer_id": "p", "reason": "failed", "message": "peer p failed: timed out"}
    ]
    assert rep.bans.ban("p", 3) == 20  # the same life: the next ban doubles
    table.incarnations["p"] = 4
    assert rep.banned_now() == set()  # a new life is not banned


def test_a_peer_without_room_or_a_lost_session_bans_nobody():
    rep, table, counted = reputation(p=1, q=1)
    for reason in ("busy", "cache_full", "too_large", "session_lost", "bad_request"):
        assert rep.on_request_failure("p", reason, "x" * 500) is None
    assert rep.banned_now() == set() and table.reported == []
    assert counted == ["busy", "cache_full", "too_large", "session_lost", "bad_request"]
    assert len(rep.log) == 2 and len(rep.log[-1]["message"]) == 300  # bounded, both


def test_a_success_lifts_the_bans_of_its_peers_but_not_a_conviction():
    rep, _, _ = reputation(p=1, q=1, r=1)
    rep.on_request_failure("p", "failed", "")
    rep.on_request_failure("q", "failed", "")
    rep.bans.convict("r", 100)
    rep.on_request_success(["p", "r"])
    assert rep.banned_now() == {"q", "r"}
    assert rep.on_request_failure("p", "failed", "") == 10  # strikes start over


def test_a_conviction_bans_any_life_and_is_shown_and_logged(caplog):
    rep, table, counted = reputation(p=1)
    with caplog.at_level(logging.WARNING, logger="layerswarm.peer"):
        rep.convict("p", 600, "outvoted")
        rep.convict("stranger", 60, "accused")
    table.incarnations["p"] = 2  # a liar restarting is still a liar
    assert rep.banned_now() == {"p", "stranger"}
    assert rep.verification.convicted == {"p": "outvoted", "stranger": "accused"}
    assert [r.getMessage() for r in caplog.records] == [
        "peer p (http://p:1) convicted: outvoted; avoided for 600 s",
        "peer stranger (?) convicted: accused; avoided for 60 s",
    ]
    assert counted == [] and list(rep.log) == [] and table.reported == []  # not a failover


def test_convictions_shown_are_the_latest_64_in_the_stats_given():
    stats = VerificationStats()
    rep = Reputation(Bans(10, 60, FakeClock()), Table({}), deque(), verification=stats)
    for i in range(70):
        rep.convict(f"p{i}", 100, f"why {i}")
    assert rep.verification is stats and list(stats.convicted) == [f"p{i}" for i in range(6, 70)]
    assert rep.bans.convicted("p0")  # the ban outlives its line on /health


# -- claims: a failure that one peer reports of another -------------------------------------------
def test_a_claim_bans_nobody_until_checked_and_holds_both_out_meanwhile():
    clock = FakeClock()
    rep, table, counted = reputation(clock, liar=1, named=1)
    claim = Claim("liar", "named", "failed", "peer named failed: refused")
    assert rep.on_claim(claim) is True
    assert rep.on_claim(claim) is False  # the same claim again: one check answers both
    assert rep.banned_now() == {"liar", "named"} and table.reported == []
    assert counted == ["failed", "failed"] and rep.log[-1]["reported_by"] == "liar"
    clock.now = CLAIM_HOLD_S + 0.1  # a check that never came back releases both
    assert rep.banned_now() == set()
    assert rep.claims.to_json() == {
        "checking": 0,
        "upheld": 0,
        "refuted": 0,
        "wrong_answers": 0,
        "suspected": [],
    }


def test_a_claim_that_holds_up_bans_the_named_peer_as_a_failure_would():
    rep, table, _ = reputation(FakeClock(), liar=1, named=1)
    claim = Claim("reporter", "named", "failed", "peer named failed: refused")
    rep.on_claim(claim)
    assert rep.claim_settled(claim, held_up=True) == ("named", 10)
    assert rep.banned_now() == {"named"} and table.reported == ["named"]
    assert rep.claims.false == {} and rep.claims.to_json()["upheld"] == 1


def test_false_claims_ban_their_reporter_doubling_across_lives_and_successes(caplog):
    clock = FakeClock()
    rep, table, _ = reputation(clock, liar=1, named=1)
    durations = []
    with caplog.at_level(logging.WARNING, logger="layerswarm.peer"):
        for i in range(5):
            claim = Claim("liar", "named", "failed", "peer named failed: refused")
            assert rep.on_claim(claim)
            durations.append(rep.claim_settled(claim, held_up=False))
            assert rep.banned_now() == {"liar"}  # the named peer is free at once
            rep.on_request_success(["liar"])  # an honest step through it lifts no false claim
            table.incarnations["liar"] = 2 + i  # nor does a new life
            assert rep.banned_now() == {"liar"}
            clock.now += 100
    assert durations == [("liar", 10), ("liar", 20), ("liar", 40), ("liar", 60), ("liar", 60)]
    assert table.reported == [] and rep.claims.false == {"liar": 5}
    assert caplog.records[0].getMessage() == (
        "peer liar reported that peer named failed, but named answers: a false claim (1 so far); "
        "peer liar banned for 10.0 s"
    )


def test_false_claims_are_remembered_for_a_bounded_number_of_reporters():
    rep, _, _ = reputation(FakeClock())
    for i in range(MAX_CLAIMANTS + 3):
        claim = Claim(f"r{i}", "named", "failed", "")
        rep.on_claim(claim)
        rep.claim_settled(claim, held_up=False)
    assert len(rep.claims.false) == MAX_CLAIMANTS and "r0" not in rep.claims.false
    claim = Claim("r9", "named", "failed", "")
    rep.on_claim(claim)
    assert rep.claim_settled(claim, held_up=False) == ("r9", 20)  # a remembered one still doubles


def test_a_false_claim_that_nobody_signed_bans_nobody():
    rep, table, _ = reputation(FakeClock(), named=1)
    claim = Claim("", "named", "failed", "peer named failed: refused")
    assert rep.on_claim(claim) and rep.banned_now() == {"", "named"}
    assert rep.claim_settled(claim, held_up=False) == ("", 0.0)
    assert rep.banned_now() == set() and table.reported == [] and rep.claims.false == {}


# -- claims that a peer answered wrong (it is alive by construction: no check settles them) ---
def wrong(reporter: str, named: str) -> Claim:
    return Claim(reporter, named, "failed", f"peer {named} failed: a step reply without tokens", WRONG_ANSWER)


def test_a_wrong_answer_claim_bans_nobody_alone_and_has_both_peers_avoided_softly():
    clock = FakeClock()
    rep, table, counted = reputation(clock, honest=1, liar=1)
    assert rep.on_wrong_answer(wrong("honest", "liar")) == []
    assert rep.on_wrong_answer(wrong("honest", "liar")) == []  # the same pair again: one claim
    assert rep.banned_now() == set() and table.reported == [] and rep.claims.false == {}
    assert rep.suspected() == {"honest", "liar"} and counted == ["failed", "failed"]
    assert rep.log[-1]["reported_by"] == "honest"
    assert rep.claims.to_json()["wrong_answers"] == 2
    assert rep.claims.to_json()["suspected"] == ["honest", "liar"]
    clock.now = WRONG_ANSWER_WINDOW_S + 1  # the window is over: forgotten
    assert rep.suspected() == set()


def test_a_peer_two_reporters_claim_against_is_banned(caplog):
    clock = FakeClock()
    rep, table, _ = reputation(clock, a=1, b=1, liar=1)
    assert rep.on_wrong_answer(wrong("a", "liar")) == []
    clock.now = 5.0
    with caplog.at_level(logging.WARNING, logger="layerswarm.peer"):
        assert rep.on_wrong_answer(wrong("b", "liar")) == [("liar", 10)]
    assert rep.banned_now() == {"liar"} and table.reported == ["liar"]
    assert "peer liar banned for 10.0 s" in caplog.text
    assert rep.suspected() == set()  # settled: a's and b's claims count against nobody now
    assert rep.claims.false == {}


def test_claims_apart_by_more_than_the_window_corroborate_nothing():
    clock = FakeClock()
    rep, _, _ = reputation(clock, a=1, b=1, liar=1)
    rep.on_wrong_answer(wrong("a", "liar"))
    clock.now = WRONG_ANSWER_WINDOW_S + 1
    assert rep.on_wrong_answer(wrong("b", "liar")) == [] and rep.banned_now() == set()


def test_a_reporter_whose_claims_name_two_peers_is_the_common_factor_and_banned_across_lives():
    clock = FakeClock()
    rep, table, _ = reputation(clock, liar=1, x=1, y=1)
    assert rep.on_wrong_answer(wrong("liar", "x")) == []
    assert rep.on_wrong_answer(wrong("liar", "y")) == [("liar", 10)]
    table.incarnations["liar"] = 2  # a new life: still banned
    rep.on_request_success(["liar"])
    assert rep.banned_now() == {"liar"} and table.reported == [] and rep.claims.false == {"liar": 1}
    assert rep.suspected() == set()  # its claims are settled: x and y are free
    clock.now = 100
    rep.on_wrong_answer(wrong("liar", "x"))
    assert rep.on_wrong_answer(wrong("liar", "y")) == [("liar", 20)]  # doubling, as false claims


def test_an_unsigned_wrong_answer_claim_counts_for_nothing():
    rep, table, counted = reputation(FakeClock(), a=1, b=1)
    for named in ("a", "b", "a"):
        assert rep.on_wrong_answer(wrong("", named)) == []
    assert rep.banned_now() == set() and rep.suspected() == set() and counted == ["failed"] * 3


def test_wrong_answer_claims_are_kept_for_a_bounded_number_of_pairs():
    rep, _, _ = reputation(FakeClock())
    for i in range(MAX_WRONG_ANSWERS + 3):
        assert rep.on_wrong_answer(wrong(f"r{i}", f"n{i}")) == []
    suspected = rep.suspected()
    assert len(suspected) == 2 * MAX_WRONG_ANSWERS and "r0" not in suspected and "n2" not in suspected


def test_a_stalled_claim_about_a_peer_that_answers_bans_nobody_and_counts_as_a_wrong_answer():
    """A hop says its next hop took the step and never answered; the named peer answers the
    entry's liveness check. Either may have held the step up (a liar next hop that stalls, or a
    liar reporter): nobody is banned on one word, both are avoided softly, and a second reporter
    about the same peer corroborates it."""
    clock = FakeClock()
    rep, table, _ = reputation(clock, a=1, b=1, staller=1)
    first = Claim("a", "staller", "failed", "peer staller failed: no answer within 5.0 s", STALLED)
    assert rep.on_claim(first) is True
    assert rep.claim_unsettled(first) == []
    assert rep.banned_now() == set() and rep.claims.false == {} and table.reported == []
    assert rep.suspected() == {"a", "staller"}
    second = Claim("b", "staller", "failed", "peer staller failed: no answer within 5.0 s", STALLED)
    rep.on_claim(second)
    assert rep.claim_unsettled(second) == [("staller", 10)]
    assert rep.banned_now() == {"staller"}
