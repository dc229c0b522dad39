"""Prompt logprobs at the OpenAI door of a 3-peer swarm: completions' `echo` with `logprobs` (what
evaluation harnesses that score log-likelihood send) and vLLM's `prompt_logprobs`, streamed and
not, equal to the monolithic model's log-softmax."""

import json

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers import monolithic

PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def expected(tiny_llama):
    """The prompt's ids, and the monolithic model's logprob of each token after the first."""
    ids = AutoTokenizer.from_pretrained(tiny_llama).encode(PROMPT)
    with torch.no_grad():
        logits = monolithic(tiny_llama)(torch.tensor([ids])).logits[0, :-1].float()
    lps = torch.log_softmax(logits, dim=-1)
    return ids, lps.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], lps


@pytest.fixture(scope="module")
def client(tiny_swarm):
    with openai.OpenAI(base_url=f"{tiny_swarm.peers[0].url}/v1", api_key="none", max_retries=0) as client:
        yield client


def post(swarm, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{swarm.peers[0].url}{path}", json=body, timeout=60)


def test_echo_with_logprobs_scores_the_prompt(client, expected):
    ids, chosen, lps = expected
    r = client.completions.create(
        model="llama", prompt=PROMPT, max_tokens=2, echo=True, logprobs=3, temperature=0
    )
    choice = r.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert torch.allclose(torch.tensor(lp.token_logprobs[1 : len(ids)]), chosen, atol=1e-4)
    assert all(len(top) in (3, 4) for top in lp.top_logprobs[1:])  # the 3 likeliest and the prompt's own
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # the same prompt without echo: the generated tokens' logprobs are the tail of the echoed ones
    plain = client.completions.create(model="llama", prompt=PROMPT, max_tokens=2, logprobs=3, temperature=0)
    assert plain.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[len(ids) :], abs=1e-5)


def test_echo_with_logprobs_streams_the_prompt_first(client, expected):
    ids, _, _ = expected
    args = dict(model="llama", prompt=PROMPT, max_tokens=3, echo=True, logprobs=1, temperature=0)
    whole = client.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**args, stream=True) if c.choices]
    assert chunks[0].text == PROMPT and len(chunks[0].logprobs.tokens) == len(ids)
    assert "".join(c.text for c in chunks) == whole.text
    streamed = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
    assert streamed[0] is None and whole.logprobs.token_logprobs[0] is None
    assert streamed[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)


def test_prompt_logprobs_as_vllm_gives_them(tiny_swarm, expected):
    ids, chosen, lps = expected
    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2, "temperature": 0}
    r = post(tiny_swarm, "/v1/completions", body)
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None
    for j, (entry, token) in enumerate(zip(got[1:], ids[1:], strict=True)):
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(chosen[j].item(), abs=1e-4)
        assert mine["rank"] == int((lps[j] > chosen[j]).sum()) + 1
        best = lps[j].topk(2).indices.tolist()
        assert [int(k) for k, v in entry.items() if v["rank"] <= 2][:2] == best or str(token) in entry
        assert {str(t) for t in best} <= set(entry)


def test_chat_prompt_logprobs_sit_beside_the_choices(tiny_swarm):
    body = {
        "model": "llama",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
        "prompt_logprobs": 0,
        "n": 2,
    }
    r = post(tiny_swarm, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    data = r.json()
    scores = data["prompt_logprobs"]
    assert scores[0] is None and len(scores) == data["usage"]["prompt_tokens"]
    assert all(len(entry) == 1 and next(iter(entry.values()))["logprob"] <= 0 for entry in scores[1:])


@pytest.mark.parametrize(
    "extra",
    [{"stream": True}, {"consensus": 2}, {"prompt_logprobs": 21}, {"prompt_logprobs": -1}],
    ids=json.dumps,
)
def test_prompt_logprobs_it_cannot_give_are_refused_by_name(tiny_swarm, extra):
    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 1, **extra}
    r = post(tiny_swarm, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert "prompt_logprobs" in json.dumps(r.json()["error"])


def test_usage_counts_the_prompt_tokens_the_prefix_cache_held(client):
    prompt = "a prompt long enough for cached prefix blocks, said twice. " * 8
    args = dict(model="llama", prompt=prompt, max_tokens=1, temperature=0)
    first = client.completions.create(**args).usage
    again = client.completions.create(**args).usage
    assert first.prompt_tokens_details.cached_tokens == 0
    assert 0 < again.prompt_tokens_details.cached_tokens < again.prompt_tokens
    scored = client.completions.create(**args, echo=True, logprobs=0).usage  # computes every position
    assert scored.prompt_tokens_details.cached_tokens == 0
