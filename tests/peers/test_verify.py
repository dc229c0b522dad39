"""Verification of what peers compute: commitments, checked generation on two routes with a
referee, consensus over k routes, and convictions of a peer serving tampered weights."""

import asyncio
import copy
import time

import pytest
import torch

from peers.consensus import checked_generate
from peers.identity import Identity
from peers.protocol import Sampling
from peers.verify import TOLERANCE, Accusation, Accusations, Commitment, agree, distance, top_entries
from tests.helpers import greedy_reference, monolithic
from tests.peers.test_inprocess import start_swarm, stop_swarm

PROMPTS_50 = [[(7 * i + j * 13) % 250 + 3 for j in range(3 + i % 9)] for i in range(50)]


def tamper(block, scale=0.02, seed=0):
    """Perturb a block's weights (a peer serving other weights than it claims)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def commitment(x: torch.Tensor, dtype="float32", identity=None) -> Commitment:
    idx, val = top_entries(x)
    c = Commitment("", 0, 2, 5, "ctx", dtype, tuple(map(tuple, idx)), tuple(map(tuple, val)))
    return c.signed(identity or Identity.generate())


def test_commitments_are_signed_and_round_trip():
    me = Identity.generate()
    c = commitment(torch.randn(2, 64), identity=me)
    assert c.peer_id == me.peer_id and c.verify(me.public_key)
    assert Commitment.from_json(c.to_json()) == c
    assert not Commitment.from_json({**c.to_json(), "start": 1}).verify(me.public_key)
    assert not c.verify(Identity.generate().public_key)
    for bad in ({"values": [[float("nan")]], "indices": [[1]]}, {"indices": "x"}, {"dtype": "int8"}):
        with pytest.raises(ValueError):
            Commitment.from_json({**c.to_json(), **bad})


def test_honest_noise_agrees_and_other_weights_do_not():
    """The tolerance against what honest recomputation differs by (batched against alone,
    prefill against decode, half precision) and what a 1% change of weights does."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(8)])
    batched = layer(x)
    assert agree(commitment(alone), commitment(batched))
    assert distance(commitment(alone), commitment(batched)) < TOLERANCE["float32"] / 100
    half = copy.deepcopy(layer).to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert agree(commitment(batched), commitment(half, "bfloat16"))
    with torch.no_grad():
        layer.weight.mul_(1.01)
    assert not agree(commitment(batched), commitment(layer(x)))


async def tokens(node, prompt, n_tokens, routes=2):
    out = []
    async for step in checked_generate(
        node, prompt, n_tokens, Sampling(temperature=0), frozenset(), routes=routes
    ):
        out.append(step[0].token)
    return out


def test_a_tampered_replica_is_outvoted_and_convicted(tiny_llama):
    """Five peers: the entry's 0:1, three replicas of 1:3 (one with tampered weights) and 3:4.
    Every request runs on two routes; a referee decides the disagreements: the users get the
    monolithic model's tokens, the liar is convicted and nobody else is."""
    model = monolithic(tiny_llama)
    prompts = PROMPTS_50[:20]
    expected = [greedy_reference(model, p, 8) for p in prompts]

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:1", "1:3", "1:3", "1:3", "3:4"])
        entry, liar = nodes[0], nodes[2]
        tamper(liar.block)
        try:
            unchecked = []
            for p in prompts:  # what users got before: the liar's tokens, whenever routed to it
                from tests.peers.test_inprocess import tokens_of

                unchecked.append(await tokens_of(entry, p, 8))
            got = [await tokens(entry, p, 8) for p in prompts]
            others = [n for n in nodes if n not in (entry, liar)]
            for _ in range(100):  # the accusation travels with gossip: every peer avoids the liar
                if all(n.bans.convicted(liar.peer_id) for n in others):
                    break
                await asyncio.sleep(0.05)
            heard = [n.bans.convicted(liar.peer_id) for n in others]
            flagged = {n.peer_id: set(n.verification.convicted) for n in nodes}
            return unchecked, got, entry.verification, liar.peer_id, heard, flagged
        finally:
            await stop_swarm(nodes)

    unchecked, got, stats, liar, heard, flagged = asyncio.run(main())
    assert unchecked != expected  # the attack works without verification
    assert got == expected
    assert set(stats.convicted) == {liar}, stats
    assert stats.requests == len(prompts) and stats.disagreements >= 1
    assert all(heard), heard
    assert all(found <= {liar} for found in flagged.values()), flagged  # no honest peer flagged


def test_five_hundred_honest_requests_flag_nobody(tiny_llama):
    """Honest replicas differ only by floating-point noise (batched with other sessions or not,
    prefill against decode): 500 checked requests, 25 at a time, convict nobody."""

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:1", "1:3", "1:3", "3:4"])
        entry = nodes[0]
        prompts = [[(11 * i + 5 * j) % 250 + 3 for j in range(2 + i % 13)] for i in range(500)]
        try:
            for k in range(0, len(prompts), 25):
                await asyncio.gather(*(tokens(entry, p, 4) for p in prompts[k : k + 25]))
            return entry.verification, [set(n.verification.convicted) for n in nodes]
        finally:
            await stop_swarm(nodes)

    stats, flagged = asyncio.run(main())
    assert stats.requests == 500 and stats.steps == 2000, stats
    assert stats.disagreements == 0 and flagged == [set()] * 4, (stats, flagged)


def test_consensus_of_three_routes_outvotes_a_liar(tiny_llama):
    """consensus: 3 runs three routes through the three replicas of 1:3; the majority decides."""
    model = monolithic(tiny_llama)
    prompts = PROMPTS_50[20:30]
    expected = [greedy_reference(model, p, 6) for p in prompts]

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:1", "1:3", "1:3", "1:3", "3:4"])
        entry, liar = nodes[-1], nodes[3]
        tamper(liar.block, seed=1)
        try:
            got = [await tokens(entry, p, 6, routes=3) for p in prompts]
            return got, entry.verification, liar.peer_id
        finally:
            await stop_swarm(nodes)

    got, stats, liar = asyncio.run(main())
    assert got == expected
    assert set(stats.convicted) == {liar}, stats


def accusation(accuser, accused, witness, *, agree_=False, until=None):
    x = torch.randn(1, 64)
    mine = commitment(x, identity=accused)
    theirs = commitment(x if agree_ else x * 1.1, identity=witness)
    until = until or time.time() + 60
    return Accusation(accused.peer_id, "", until, "test", (mine, theirs)).signed(accuser)


def test_accusations_hold_only_with_their_evidence():
    ids = {name: Identity.generate() for name in ("accuser", "accused", "witness", "stranger")}
    keys = {i.peer_id: i.public_key for name, i in ids.items() if name != "stranger"}
    avoided = []
    held = Accusations(keys.get, lambda p, s, why: avoided.append(p), 3600)
    a, b, w = ids["accuser"], ids["accused"], ids["witness"]
    good = accusation(a, b, w)
    assert good.problem(keys.get) is None
    bad = [
        accusation(a, b, w, agree_=True),  # the commitments agree: no lie shown
        accusation(a, b, b),  # the accused as its own witness
        accusation(a, b, a),  # the accuser as the witness
        accusation(ids["stranger"], b, w),  # an accuser this peer does not know
        Accusation(**{**good.__dict__, "reason": "changed after signing"}),
        accusation(a, b, w, until=time.time() - 1),  # expired
    ]
    assert held.receive([x.to_json() for x in bad], me="me") == 0 and avoided == []
    assert held.receive([good.to_json()], me="me") == 1 and avoided == [b.peer_id]
    assert held.receive([good.to_json()], me="me") == 0  # once
    assert held.outgoing() == [good.to_json()]
    for malformed in ([{"accused": 1}], "x", [good.to_json()] * 33):
        with pytest.raises(ValueError):
            held.receive(malformed, me="me")


def test_a_last_peer_answering_a_false_token_convicts_itself(tiny_llama):
    """A last peer that computes honestly but answers another token than the argmax of the
    logits it signed: its own commitment is the evidence."""
    from dataclasses import replace

    model = monolithic(tiny_llama)
    prompts = PROMPTS_50[30:36]
    expected = [greedy_reference(model, p, 6) for p in prompts]

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:1", "1:3", "3:4", "3:4"])
        entry, liar = nodes[0], nodes[2]
        honest_run = liar.scheduler.run

        async def lying_run(job):
            out = await honest_run(job)
            return replace(out, tokens=[(t + 1) % 256 for t in out.tokens]) if job.sampling else out

        liar.scheduler.run = lying_run
        try:
            got = [await tokens(entry, p, 6) for p in prompts]
            return got, entry.verification, liar.peer_id
        finally:
            await stop_swarm(nodes)

    got, stats, liar = asyncio.run(main())
    assert got == expected
    assert set(stats.convicted) == {liar} and "argmax" in stats.convicted[liar]
