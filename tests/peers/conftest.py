import pytest

from tests.peers.processes import Swarm, tiny_route


@pytest.fixture(scope="module")
def tiny_swarm(tiny_llama, tmp_path_factory):
    """Three peers of the tiny Llama: layers 0:1, 1:3, 3:4."""
    with tiny_route(tiny_llama, tmp_path_factory.mktemp("logs")) as swarm:
        yield swarm


@pytest.fixture
def make_swarm(tmp_path):
    """Build a swarm inside a test; all its peers are stopped afterwards."""
    swarms = []

    def make(model, args=()):
        swarms.append(Swarm(model, tmp_path, args))
        return swarms[-1]

    yield make
    for s in swarms:
        s.stop()
