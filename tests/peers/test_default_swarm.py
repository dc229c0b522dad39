"""The default model on three peers: the official openai client gets the monolithic model's text;
many concurrent requests complete or get a quick 429; clients that hang up stop their generation;
an entry told to stop ends its streams cleanly."""

import asyncio
import json
import signal
import time

import httpx
import pytest
import torch

from inference import Tokenizer
from tests.helpers import monolithic
from tests.peers.processes import Swarm, wait_until

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


def open_sessions(swarm) -> list[int]:
    return [(p.health() or {}).get("sessions", -1) for p in swarm.peers if p.alive()]


def test_128_concurrent_requests_complete_or_get_a_quick_429(smol_swarm):
    entry = smol_swarm.peers[0]
    body = {"model": "smollm2-135m", "max_tokens": 8, "temperature": 0, "ignore_eos": True}

    async def one(client, i):
        chat = {**body, "messages": [{"role": "user", "content": f"Count to {i}."}]}
        return await client.post(f"{entry.url}/v1/chat/completions", json=chat)

    async def main():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(128)))

    results = asyncio.run(main())
    statuses = [r.status_code for r in results]
    assert set(statuses) <= {200, 429}, statuses  # no 5xx, no hang
    assert statuses.count(200) >= 64  # the entry admits --max-requests (64) at once
    for r in results:
        if r.status_code == 429:  # refused at the door (the admission limit), not after queueing
            assert r.headers["retry-after"] == "1"
            assert "--max-requests 64" in r.json()["error"]["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] == 8
    wait_until(lambda: not any(open_sessions(smol_swarm)), 30, smol_swarm._why)


LONG_STORY = {
    "model": "smollm2-135m",
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 400,
    "ignore_eos": True,
    "stream": True,
}


def stream_some(entry, tokens: int) -> None:
    """Start a long streamed generation, read `tokens` deltas, then hang up."""
    seen = 0
    with httpx.stream("POST", f"{entry.url}/v1/chat/completions", json=LONG_STORY, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
                if seen >= tokens:
                    break


def steps_served(swarm) -> list[int]:
    return [p.health()["steps_served"] for p in swarm.peers]


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_stops_its_generation(smol_swarm, stream):
    entry = smol_swarm.peers[0]
    if stream:
        stream_some(entry, 5)
    else:
        body = {"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{entry.url}/v1/completions", json=body, timeout=2.0)
    wait_until(lambda: not any(open_sessions(smol_swarm)), 5, smol_swarm._why, interval_s=0.1)
    before = steps_served(smol_swarm)
    time.sleep(1.0)
    assert steps_served(smol_swarm) == before  # nothing runs for the departed client


def test_a_stream_that_cannot_start_gets_its_real_status(smol_swarm):
    """An entry admitting one request at a time, and none waiting: a second streamed request
    gets 429 with Retry-After as its status, not 200 followed by an error event."""
    entry = smol_swarm.add("0:1", args=["--max-requests", "1", "--max-waiting", "0"])
    smol_swarm.wait_ready([entry], timeout_s=300)
    smol_swarm.wait_route(entry)
    with httpx.stream("POST", f"{entry.url}/v1/chat/completions", json=LONG_STORY, timeout=120) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        seen = [next(lines), next(lines), next(lines)]  # the first request is under way
        r = httpx.post(f"{entry.url}/v1/chat/completions", json=LONG_STORY, timeout=30)
    assert r.status_code == 429 and r.headers["retry-after"] == "1", (seen, r.text[:300])
    assert "--max-requests 1" in r.json()["error"]["message"]
    entry.stop()


def test_sigterm_on_an_entry_ends_its_streams_cleanly(smol_swarm):
    """A peer outside every route (layers 0:1) as the entry, drained for 1 s: its stream ends with
    an error event and [DONE], and the sessions it opened downstream are closed."""
    entry = smol_swarm.add("0:1", args=["--drain", "1"])
    smol_swarm.wait_ready([entry], timeout_s=300)
    smol_swarm.wait_route(entry)
    events = []
    with httpx.stream("POST", f"{entry.url}/v1/chat/completions", json=LONG_STORY, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 5:
                entry.signal(signal.SIGTERM)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert "error" in last and "shutting down" in last["error"]["message"]
    assert entry.proc.wait(30) == 0
    wait_until(lambda: not any(open_sessions(smol_swarm)), 5, smol_swarm._why, interval_s=0.1)


PASSAGE = (
    "The lighthouse stood on the northern cliff for two hundred years. Every night its keeper "
    "climbed the ninety steps, trimmed the wick, and watched the ships pass safely into the harbour."
)


def test_speculation_gives_the_same_text_and_keeps_drafts(smol_swarm, default_model):
    """Draftable text (repeat a passage): with drafting (the default) and without it, chat and
    completions, streamed and not, give the monolithic model's greedy text; stop strings cut
    exactly where they do without drafting; and drafts were kept."""
    openai = pytest.importorskip("openai")
    entry = smol_swarm.peers[0]
    client = openai.OpenAI(base_url=f"{entry.url}/v1", api_key="-", max_retries=0, timeout=120)
    content = f"Repeat this passage exactly:\n\n{PASSAGE}"
    expected = monolithic_chat(default_model, content, 48)
    before = httpx.get(f"{entry.url}/health").json()["speculation"]
    messages = [{"role": "user", "content": content}]
    texts = {}
    for speculative in (True, False):
        extra = {"speculative": speculative}
        whole = client.chat.completions.create(
            model="smollm2-135m", messages=messages, max_tokens=48, temperature=0, extra_body=extra
        )
        stream = client.chat.completions.create(
            model="smollm2-135m",
            messages=messages,
            max_tokens=48,
            temperature=0,
            stream=True,
            extra_body=extra,
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        prompt = f"{PASSAGE}\n\n{PASSAGE[:60]}"
        text = client.completions.create(
            model="smollm2-135m", prompt=prompt, max_tokens=40, temperature=0, extra_body=extra
        )
        stopped = client.completions.create(
            model="smollm2-135m",
            prompt=prompt,
            max_tokens=40,
            temperature=0,
            stop=["ninety"],
            extra_body=extra,
        )
        texts[speculative] = (whole.choices[0].message.content, streamed, text.choices[0].text, stopped)
    assert texts[True][0] == texts[True][1] == expected
    assert texts[True][:3] == texts[False][:3]
    spec_stop, plain_stop = texts[True][3].choices[0], texts[False][3].choices[0]
    assert spec_stop.text == plain_stop.text and spec_stop.finish_reason == plain_stop.finish_reason == "stop"
    assert "ninety" not in spec_stop.text and texts[True][2].startswith(spec_stop.text)
    after = httpx.get(f"{entry.url}/health").json()["speculation"]
    assert after["enabled"] and after["accepted"] - before["accepted"] > 20, (before, after)
