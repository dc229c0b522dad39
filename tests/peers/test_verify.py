"""Verification of what peers compute: commitments, checked generation on two routes with a
referee, consensus over k routes, and convictions of a peer serving tampered weights."""

import asyncio
import copy
import math

import pytest
import torch

from peers.consensus import checked_generate
from peers.identity import Identity
from peers.protocol import Sampling
from peers.verify import TOLERANCE, Commitment, agree, distance, top_entries
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
            return unchecked, got, entry.verification, liar.peer_id, [n.peer_id for n in nodes]
        finally:
            await stop_swarm(nodes)

    unchecked, got, stats, liar, ids = asyncio.run(main())
    assert unchecked != expected  # the attack works without verification
    assert got == expected
    assert set(stats.convicted) == {liar}, stats
    assert stats.requests == len(prompts) and stats.disagreements >= 1
    assert math.isfinite(stats.steps)
