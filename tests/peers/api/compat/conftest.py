"""One swarm of the default model (two peers) for every module here: started at the first test
that needs it, stopped after the last (package scope), so splitting the tests by client costs no
second start."""

import os

import openai
import pytest

from tests.peers.processes import Swarm

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm goes online at import otherwise


@pytest.fixture(scope="package")
def swarm(default_model, tmp_path_factory):
    # these tests are about the door, not membership: a peer busy with a long prompt on a loaded
    # machine may send no gossip for seconds, and must not drop out of the entry's routes meanwhile
    calm = ["--suspect-after", "30", "--dead-after", "60", "--tombstone", "120"]
    swarm = Swarm("smollm2-135m", tmp_path_factory.mktemp("compat-logs"), args=calm)
    try:
        swarm.add("0:15")
        swarm.add("15:30")
        swarm.wait_ready(timeout_s=300)
        swarm.wait_route(swarm.peers[0])
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="package")
def addr(swarm) -> str:
    return swarm.peers[0].address


@pytest.fixture(scope="package")
def client(addr):
    with openai.OpenAI(base_url=f"http://{addr}/v1", api_key="none", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture(scope="package")
def model_id(client) -> str:
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-135m"], models
    return models[0].id
