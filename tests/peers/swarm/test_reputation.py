"""The entry's bans: doubling backoff, lifted by success or by a new life of the peer."""

from peers.swarm.reputation import Bans
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
