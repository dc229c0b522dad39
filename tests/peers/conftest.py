import pytest

from tests.peers.processes import Swarm


@pytest.fixture(scope="module")
def tiny_swarm(tiny_llama, tmp_path_factory):
    """Three peers of the tiny Llama: layers 0:1, 1:3, 3:4."""
    swarm = Swarm(tiny_llama, tmp_path_factory.mktemp("logs"))
    try:
        for layers in ("0:1", "1:3", "3:4"):
            swarm.add(layers)
        swarm.wait_ready()
        for peer in swarm.peers:
            swarm.wait_route(peer)
        yield swarm
    finally:
        swarm.stop()


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
