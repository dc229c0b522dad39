"""The default model on three peers: the official openai client gets the monolithic model's text."""

import pytest
import torch

from inference import Tokenizer
from tests.helpers import monolithic
from tests.peers.swarm import Swarm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_swarm(default_model, tmp_path_factory):
    swarm = Swarm("smollm2-135m", tmp_path_factory.mktemp("smol-logs"))
    try:
        for layers in ("0:10", "10:20", "20:30"):
            swarm.add(layers)
        swarm.wait_ready(timeout_s=300)
        swarm.wait_route(swarm.peers[0])
        yield swarm
    finally:
        swarm.stop()


def monolithic_chat(path, content: str, max_tokens: int) -> str:
    tok = Tokenizer(path)
    ids = tok.encode_chat([{"role": "user", "content": content}])
    out = monolithic(path).generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_tokens,
        do_sample=False,
    )
    new = out[0, len(ids) :].tolist()
    return tok.decode([t for t in new if t not in tok.eos_token_ids])


def test_openai_client_gets_monolithic_text(smol_swarm, default_model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{smol_swarm.peers[0].url}/v1", api_key="-", max_retries=0, timeout=120)
    for content in ("What is the capital of France?", "Name three colors."):
        expected = monolithic_chat(default_model, content, 32)
        messages = [{"role": "user", "content": content}]
        whole = client.chat.completions.create(
            model="smollm2-135m", messages=messages, max_tokens=32, temperature=0
        )
        assert whole.choices[0].message.content == expected
        stream = client.chat.completions.create(
            model="smollm2-135m", messages=messages, max_tokens=32, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    client.close()
    assert "Paris" in monolithic_chat(default_model, "What is the capital of France?", 32)
