"""Three real peers of a tiny random model, used through HTTP, the SDK and the openai package."""

import asyncio
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from transformers import AutoTokenizer

from peers import AsyncSwarmClient, SwarmAPIError, SwarmClient
from tests.helpers import greedy_reference, monolithic
from tests.peers.processes import wait_until


@pytest.fixture(scope="module")
def reference(tiny_llama):
    model = monolithic(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)

    def greedy_text(prompt_ids: list[int], max_tokens: int) -> str:
        return tok.decode(greedy_reference(model, prompt_ids, max_tokens, eos=2), skip_special_tokens=True)

    def chat_ids(content: str) -> list[int]:
        ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    return greedy_text, chat_ids, tok


def post(peer, path, body, timeout=60):
    return httpx.post(f"{peer.url}{path}", json=body, timeout=timeout)


PROMPTS = [
    "hello swarm",
    "the quick brown fox",
    "0123456789",
    "abc",
    "LayerSwarm!",
    "zz top",
    "pipeline",
    "x",
]


def test_greedy_output_equals_monolithic(tiny_swarm, reference):
    greedy_text, chat_ids, tok = reference
    entry, last = tiny_swarm.peers[0], tiny_swarm.peers[2]
    for peer in (entry, last):  # any peer is an entry
        r = post(
            peer,
            "/v1/completions",
            {"model": "llama", "prompt": "hello swarm", "max_tokens": 24, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy_text(tok.encode("hello swarm"), 24)
    body = {
        "model": "llama",
        "messages": [{"role": "user", "content": "hi there"}],
        "max_tokens": 24,
        "temperature": 0,
    }
    r = post(entry, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["message"]["content"] == greedy_text(chat_ids("hi there"), 24)
    assert data["usage"]["prompt_tokens"] == len(chat_ids("hi there"))


def test_seeded_sampling_is_reproducible(tiny_swarm):
    entry = tiny_swarm.peers[1]

    def sampled(seed):
        body = {"model": "llama", "prompt": "abc", "max_tokens": 16, "temperature": 1.0, "seed": seed}
        r = post(entry, "/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert sampled(1) == sampled(1)
    assert len({sampled(1), sampled(2), sampled(3)}) > 1


def test_eight_concurrent_requests(tiny_swarm, reference):
    greedy_text, _, tok = reference
    entry = tiny_swarm.peers[0]

    def one(prompt):
        body = {"model": "llama", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        return post(entry, "/v1/completions", body, timeout=120).json()["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, PROMPTS))
    assert got == [greedy_text(tok.encode(p), 16) for p in PROMPTS]


def test_staggered_concurrent_requests_of_mixed_lengths(tiny_swarm, reference):
    """Requests arriving while others decode, with different prompt and output lengths: each
    equals its own monolithic greedy text, and seeded sampled text equals the text it gives alone."""
    greedy_text, _, tok = reference
    entry = tiny_swarm.peers[1]
    seeded = {"model": "llama", "prompt": "seeded", "max_tokens": 20, "temperature": 0.9, "seed": 11}
    alone = post(entry, "/v1/completions", seeded).json()["choices"][0]["text"]

    def one(i):
        time.sleep(0.05 * i)  # staggered arrivals
        if i == 3:
            return post(entry, "/v1/completions", seeded, timeout=120).json()["choices"][0]["text"]
        body = {
            "model": "llama",
            "prompt": PROMPTS[i] * (1 + i % 3),
            "max_tokens": 8 + 4 * i,
            "temperature": 0,
        }
        return post(entry, "/v1/completions", body, timeout=120).json()["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    for i, text in enumerate(got):
        expected = alone if i == 3 else greedy_text(tok.encode(PROMPTS[i] * (1 + i % 3)), 8 + 4 * i)
        assert text == expected, i


def test_a_tiny_temperature_is_greedy_not_a_failed_batch(tiny_swarm, reference):
    """1e-30 passes validation; dividing logits by it would make the whole forward's sampling
    fail (and get the last peer banned by every entry with a session in it)."""
    greedy_text, _, tok = reference
    body = {"model": "llama", "prompt": "abc", "max_tokens": 8, "temperature": 1e-30}
    r = post(tiny_swarm.peers[0], "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy_text(tok.encode("abc"), 8)


def test_n_sequences_share_one_prompt(tiny_swarm, reference):
    greedy_text, _, tok = reference
    entry = tiny_swarm.peers[0]
    body = {"model": "llama", "prompt": "the quick brown fox", "max_tokens": 12, "temperature": 0, "n": 3}
    r = post(entry, "/v1/completions", body)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    assert texts == [greedy_text(tok.encode("the quick brown fox"), 12)] * 3  # greedy: all alike
    used = r.json()["usage"]["completion_tokens"]
    assert used % 3 == 0 and 3 <= used <= 36  # three alike sequences of at most 12 tokens

    sampled = {**body, "temperature": 1.0, "seed": 5, "stream": True}
    deltas: dict[int, list[str]] = {0: [], 1: [], 2: []}
    finishes = {}
    with httpx.stream("POST", f"{entry.url}/v1/completions", json=sampled, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                deltas[choice["index"]].append(choice["text"])
                if choice["finish_reason"]:
                    finishes[choice["index"]] = choice["finish_reason"]
    streamed = ["".join(deltas[i]) for i in range(3)]
    assert len(set(streamed)) > 1  # the sequences sample on their own
    assert set(finishes) == {0, 1, 2}
    whole = post(entry, "/v1/completions", {**sampled, "stream": False}).json()
    assert [c["text"] for c in whole["choices"]] == streamed  # seeded: the same again


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "llama", "prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
        ({"model": "llama", "messages": []}, 400, "messages"),
        ({"model": "nope", "prompt": "a"}, 404, "does not exist"),
        ({"model": "llama", "prompt": "a" * 600}, 400, "maximum context length is 512"),
        ({"model": "llama", "prompt": "a", "max_tokens": 600}, 400, "maximum context length is 512"),
        ({"model": "llama", "prompt": "a", "n": 17}, 400, "n"),
        ({"model": "llama", "prompt": "a", "temperature": 5}, 400, "temperature"),
    ],
)
def test_invalid_requests_get_openai_errors(tiny_swarm, body, status, says):
    entry = tiny_swarm.peers[0]
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    if isinstance(body, bytes):
        r = httpx.post(f"{entry.url}{path}", content=body, headers={"content-type": "application/json"})
    else:
        r = post(entry, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert says in err["message"] and err["type"]
    assert all(p.health() for p in tiny_swarm.peers)


def test_models_and_stop_strings(tiny_swarm, reference):
    greedy_text, _, tok = reference
    entry = tiny_swarm.peers[0]
    assert httpx.get(f"{entry.url}/v1/models").json()["data"][0]["id"] == "llama"
    full = greedy_text(tok.encode("pipeline"), 24)
    stop = full[5:7]
    r = post(
        entry,
        "/v1/completions",
        {"model": "llama", "prompt": "pipeline", "max_tokens": 24, "temperature": 0, "stop": stop},
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"


def test_sdk_sync_stream_and_async(tiny_swarm, reference):
    greedy_text, chat_ids, tok = reference
    expected = greedy_text(chat_ids("sdk"), 12)
    with SwarmClient(tiny_swarm.peers[1].address) as client:
        done = client.chat("sdk", max_tokens=12, temperature=0)
        assert done.text == expected and done.usage.completion_tokens >= 1
        assert "".join(client.chat("sdk", max_tokens=12, temperature=0, stream=True)) == expected
        assert client.complete("x", max_tokens=8, temperature=0).text == greedy_text(tok.encode("x"), 8)
        with pytest.raises(SwarmAPIError, match="400"):
            client.complete("x", max_tokens=-1)

    async def run():
        async with AsyncSwarmClient(tiny_swarm.peers[2].address) as client:
            whole = await client.chat("sdk", max_tokens=12, temperature=0)
            streamed = "".join([d async for d in client.stream_chat("sdk", max_tokens=12, temperature=0)])
            return whole.text, streamed

    assert asyncio.run(run()) == (expected, expected)


def test_openai_package_streaming(tiny_swarm, reference):
    openai = pytest.importorskip("openai")
    greedy_text, chat_ids, _ = reference
    client = openai.OpenAI(base_url=f"{tiny_swarm.peers[0].url}/v1", api_key="-", max_retries=0)
    messages = [{"role": "user", "content": "stream me"}]
    stream = client.chat.completions.create(
        model="llama",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_text(chat_ids("stream me"), 12)
    assert chunks[-1].usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=messages)
    client.close()


def test_peer_status_prints_the_swarm(tiny_swarm):
    done = subprocess.run(
        [sys.executable, "-m", "peers.cli", "status", "--peer", tiny_swarm.peers[2].address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for peer in tiny_swarm.peers:
        assert peer.address in done.stdout
    assert "0-3: x1" in done.stdout and "gaps: none" in done.stdout


def test_sessions_are_closed_on_every_peer_after_requests(tiny_swarm):
    entry = tiny_swarm.peers[0]
    for stream in (False, True):
        body = {"model": "llama", "prompt": "close me", "max_tokens": 6, "temperature": 0, "stream": stream}
        assert post(entry, "/v1/completions", body).status_code == 200
    wait_until(lambda: all(p.health()["sessions"] == 0 for p in tiny_swarm.peers), 10)
