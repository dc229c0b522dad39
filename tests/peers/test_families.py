"""Every family a block hosts, served by a swarm of three peers (in one process, over httpx's
in-memory transport): greedy text through the OpenAI API equal to transformers' monolithic model,
8 concurrent sessions batched, prompt prefixes reused, drafted tokens checked (speculation), a
replica that drops out mid-generation failed over exactly, and checked requests whose replicas'
commitments agree."""

import asyncio

import httpx
import pytest
from transformers import AutoTokenizer

from peers.entry.consensus import verified_generate
from peers.entry.generation import generate
from peers.transport.frames import Sampling
from tests.helpers import FAMILIES, greedy_reference, monolithic
from tests.peers.test_inprocess import start_swarm, stop_swarm, tokens_of

SHARED = list(range(3, 70))  # 67 tokens: two prefix-cache blocks of 32, shared by every prompt
PROMPTS = [SHARED + [80 + i, 90, 91 + i] for i in range(8)]
TOKENS = 12


async def openai(net, entry, path: str, body: dict) -> dict:
    """A greedy request to the entry's OpenAI API."""
    async with httpx.AsyncClient(transport=net, base_url=f"http://{entry.config.address}") as client:
        body = {"model": entry.model_id, "max_tokens": TOKENS, "temperature": 0, **body}
        r = await client.post(path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


async def chat(net, entry, text: str) -> str:
    reply = await openai(
        net, entry, "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}
    )
    return reply["message"]["content"]


async def completion(net, entry, ids: list[int]) -> str:
    return (await openai(net, entry, "/v1/completions", {"prompt": ids, "ignore_eos": True}))["text"]


async def drafted_tokens(entry, prompt):
    """One greedy generation with drafting on (the chain checks the drafts)."""
    out = []
    async for step in generate(entry, prompt, TOKENS, Sampling(temperature=0), frozenset(), speculative=True):
        out.append(step[0].token)
    return out


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_swarm_of_each_family_serves_the_monolithic_text(family_model, kind):
    path = family_model(kind)
    model, tok = monolithic(path), AutoTokenizer.from_pretrained(path)
    expected = [greedy_reference(model, p, TOKENS) for p in PROMPTS]
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "hi swarm"}], add_generation_prompt=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    chat_text = tok.decode(greedy_reference(model, chat_ids, TOKENS, eos=2), skip_special_tokens=True)

    async def main():
        net, nodes = await start_swarm(path, ["0:1", "1:3", "3:4"])
        entry = nodes[0]
        try:
            first = await asyncio.gather(*(tokens_of(entry, p, TOKENS) for p in PROMPTS))
            again = await asyncio.gather(*(completion(net, entry, p) for p in PROMPTS))  # the OpenAI door
            hits = sum(n.block.prefixes.hits for n in nodes)
            batched = [n.scheduler.stats.max_batch_steps for n in nodes]
            text = await chat(net, entry, "hi swarm")
            return first, again, hits, batched, text
        finally:
            await stop_swarm(nodes)

    first, again, hits, batched, text = asyncio.run(main())
    assert first == expected
    assert again == [tok.decode(ids, skip_special_tokens=True) for ids in expected]
    assert hits > 0  # the second round restored the shared prefix
    assert all(size > 1 for size in batched), batched
    assert text == chat_text


@pytest.mark.parametrize("kind", FAMILIES)
def test_drafted_and_failed_over_generations_of_each_family_stay_exact(family_model, kind):
    """Speculation (drafts from a draft model, which rewinds what the chain rejects) and a replica of 0:2 dropping out
    after a few tokens: every text is still the monolithic model's."""
    path = family_model(kind)
    model = monolithic(path)
    looping = [7, 8, 9, 10, 11] * 6
    expected = [greedy_reference(model, p, TOKENS) for p in [looping, *PROMPTS[:4]]]

    async def main():
        # entry (drafting with the same model as its draft model), 2 replicas, tail
        net, nodes = await start_swarm(
            path, ["0:4", "0:2", "0:2", "2:4"], settings={0: {"draft_model": str(path)}}
        )
        entry, replicas, dropped = nodes[0], nodes[1:3], []

        def drop(count):
            if count == 4 and not dropped:  # the replica holding the sessions goes away
                victim = max(replicas, key=lambda n: n.block.open_sessions())
                net.down.add(victim.config.address)
                dropped.append(victim)

        try:
            entry.bans.ban(entry.peer_id, entry.table.me.incarnation)  # keep the entry off the routes
            drafted = await drafted_tokens(entry, looping)
            failed_over = await asyncio.gather(*(tokens_of(entry, p, TOKENS, drop) for p in PROMPTS[:4]))
            return [drafted, *failed_over], entry.speculation.drafted, entry.failovers, dropped
        finally:
            await stop_swarm(nodes)

    got, drafted, failovers, dropped = asyncio.run(main())
    assert got == expected
    assert drafted > 0
    assert dropped and failovers >= 1


@pytest.mark.parametrize("kind", FAMILIES)
def test_checked_requests_of_each_family_agree_across_replicas(family_model, kind):
    """Spans 0:1, 1:2 twice, 2:4 twice and an entry at --verify-rate 1: every step of every hop
    is recomputed by the other replica and the commitments agree (nobody convicted), the text
    the monolithic model's."""
    path = family_model(kind)
    model = monolithic(path)
    expected = [greedy_reference(model, p, 8) for p in PROMPTS[:2]]

    async def main():
        settings = {0: {"verify_rate": 1.0}}
        net, nodes = await start_swarm(path, ["0:1", "1:2", "1:2", "2:4", "2:4"], settings=settings)
        entry = nodes[0]
        try:
            got = []
            for prompt in PROMPTS[:2]:
                gen = verified_generate(entry, prompt, 8, Sampling(temperature=0), frozenset())
                got.append([step[0].token async for step in gen])
            return got, entry.verification
        finally:
            await stop_swarm(nodes)

    got, stats = asyncio.run(main())
    assert got == expected
    assert stats.steps > 0 and stats.unchecked_steps == 0, stats
    assert stats.disagreements == 0 and not stats.convicted, stats
