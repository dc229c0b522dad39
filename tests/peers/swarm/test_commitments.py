"""Verification of what peers compute: commitments, checked generation on two routes with a
referee, consensus over k routes, and convictions of a peer serving tampered weights."""

import asyncio
import copy
import time

import httpx
import pytest
import torch

from peers.entry.consensus import checked_generate, verified_generate
from peers.swarm.commitments import (
    TOLERANCE,
    Accusation,
    Accusations,
    Commitment,
    agree,
    checked_shadows,
    distance,
    top_entries,
)
from peers.swarm.identity import Identity
from peers.transport.frames import Sampling
from tests.helpers import greedy_reference, monolithic
from tests.peers.processes import wait_until
from tests.peers.test_inprocess import start_swarm, stop_swarm

KEY = b"a private swarm's shared key"
PROMPTS_50 = [[(7 * i + j * 13) % 250 + 3 for j in range(3 + i % 9)] for i in range(50)]


def tamper(block, scale=0.02, seed=0):
    """Perturb a block's weights (a peer serving other weights than it claims)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def commitment(x: torch.Tensor, dtype="float32", identity=None) -> Commitment:
    """A commitment to output x (and to an input of zeros)."""
    rows = lambda pair: tuple(tuple(map(tuple, part)) for part in pair)  # noqa: E731
    (idx, val), (in_idx, in_val) = rows(top_entries(x)), rows(top_entries(torch.zeros(x.shape[0], 4)))
    c = Commitment("", 0, 2, 5, "ctx", dtype, idx, val, "in", "out", in_idx, in_val)
    return c.signed(identity or Identity.generate())


def test_commitments_are_signed_and_round_trip():
    me = Identity.generate()
    c = commitment(torch.randn(2, 64), identity=me)
    assert c.peer_id == me.peer_id and c.verify(me.public_key)
    assert Commitment.from_json(c.to_json()) == c
    assert not Commitment.from_json({**c.to_json(), "start": 1}).verify(me.public_key)
    assert not c.verify(Identity.generate().public_key)
    for bad in ({"values": [[float("nan")]], "indices": [[1]]}, {"indices": "x"}, {"dtype": "int3"}):
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


async def tokens(node, prompt, n_tokens, routes=None):
    """Greedy tokens, checked by shadows (as --verify-rate does), or by `routes` whole routes (as
    the consensus request field does)."""
    sampling = Sampling(temperature=0)
    if routes is None:
        gen = verified_generate(node, prompt, n_tokens, sampling, frozenset())
    else:
        gen = checked_generate(node, prompt, n_tokens, sampling, frozenset(), routes=routes)
    return [step[0].token async for step in gen]


def run_with_liar(tiny_llama, spans, entry_at, liar_at, lie, prompts, n_tokens, routes=None, **entry_config):
    """Greedy tokens of `prompts` asked at nodes[entry_at] of an in-process swarm of `spans`,
    where lie(nodes[liar_at]) made that peer a liar: (tokens, monolithic tokens, the entry's
    verification stats, the liar's id)."""
    from dataclasses import replace

    model = monolithic(tiny_llama)
    expected = [greedy_reference(model, p, n_tokens) for p in prompts]

    async def main():
        net, nodes = await start_swarm(tiny_llama, spans)
        entry, liar = nodes[entry_at], nodes[liar_at]
        entry.config = replace(entry.config, **entry_config)
        lie(liar)
        try:
            got = [await tokens(entry, p, n_tokens, routes) for p in prompts]
            return got, entry.verification, liar.peer_id
        finally:
            await stop_swarm(nodes)

    got, stats, liar = asyncio.run(main())
    return got, expected, stats, liar


def test_a_tampered_replica_is_outvoted_and_convicted(tiny_llama):
    """Five peers: the entry's 0:1, three replicas of 1:3 (one with tampered weights) and 3:4.
    Every step of every request has its 1:3 hop recomputed by another replica on the same input;
    a referee route decides the disagreements: the users get the monolithic model's tokens, the
    liar is convicted and nobody else is."""
    model = monolithic(tiny_llama)
    prompts = PROMPTS_50[:20]
    expected = [greedy_reference(model, p, 8) for p in prompts]

    async def main():
        # a private swarm: its members act on each other's accusations
        net, nodes = await start_swarm(tiny_llama, ["0:1", "1:3", "1:3", "1:3", "3:4"], KEY)
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
    prefill against decode): 500 checked requests, 50 at a time, convict nobody."""

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:1", "1:3", "1:3", "3:4"])
        entry = nodes[0]
        prompts = [[(11 * i + 5 * j) % 250 + 3 for j in range(2 + i % 13)] for i in range(500)]
        try:
            for k in range(0, len(prompts), 50):
                await asyncio.gather(*(tokens(entry, p, 4) for p in prompts[k : k + 50]))
            return entry.verification, [set(n.verification.convicted) for n in nodes]
        finally:
            await stop_swarm(nodes)

    stats, flagged = asyncio.run(main())
    assert stats.requests == 500 and stats.steps == 2000 and stats.unchecked_steps == 0, stats
    assert stats.disagreements == 0 and flagged == [set()] * 4, (stats, flagged)


def test_consensus_of_three_routes_outvotes_a_liar(tiny_llama):
    """consensus: 3 runs three routes through the three replicas of 1:3; the majority decides."""
    spans = ["0:1", "1:3", "1:3", "1:3", "3:4"]
    lie = lambda node: tamper(node.block, seed=1)  # noqa: E731
    got, expected, stats, liar = run_with_liar(tiny_llama, spans, -1, 3, lie, PROMPTS_50[20:30], 6, routes=3)
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
    held = Accusations(keys.get, lambda p, s, why: avoided.append(p), 3600, trusted=True)
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
    for malformed in ([{"accused": 1}], "x", [good.to_json()] * 33, [{**good.to_json(), "until": 10**400}]):
        with pytest.raises(ValueError):
            held.receive(malformed, me="me")
    # in an open swarm keys are free and evidence does not say who lied: heard, not acted on
    open_swarm = Accusations(keys.get, lambda p, s, why: avoided.append(p), 3600, trusted=False)
    assert open_swarm.receive([good.to_json()], me="me") == 0 and open_swarm.ignored == 1
    assert open_swarm.outgoing() == [] and avoided == [b.peer_id]


def test_a_last_peer_answering_a_false_token_convicts_itself(tiny_llama):
    """A last peer that computes honestly but answers another token than the argmax of the
    logits it signed: its own commitment is the evidence."""
    from dataclasses import replace

    def lie(node):
        honest_run = node.scheduler.run

        async def lying_run(job):
            out = await honest_run(job)
            return replace(out, tokens=[(t + 1) % 256 for t in out.tokens]) if job.sampling else out

        node.scheduler.run = lying_run

    spans = ["0:1", "1:3", "3:4", "3:4"]
    got, expected, stats, liar = run_with_liar(tiny_llama, spans, 0, 2, lie, PROMPTS_50[30:36], 6)
    assert got == expected
    assert set(stats.convicted) == {liar} and "argmax" in stats.convicted[liar]


# -- real peers, through the OpenAI door -------------------------------------------------------------
TAMPERED_WEIGHTS = """
import torch
import inference.block as b
_load = b.Block.load_weights
def load_tampered(self, *args, **kwargs):
    _load(self, *args, **kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in self.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
b.Block.load_weights = load_tampered
"""


def texts(tiny_llama, prompts, n_tokens) -> list[str]:
    """The monolithic model's greedy completions of `prompts`."""
    from transformers import AutoTokenizer

    model, tok = monolithic(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    return [
        tok.decode(greedy_reference(model, tok.encode(p), n_tokens, eos=2), skip_special_tokens=True)
        for p in prompts
    ]


def liar_swarm(make_swarm, tiny_llama, entry_args, patch, honest=1):
    """Real peers: an entry 0:1 (with `entry_args`), `honest` honest replicas of 1:3 and a liar
    (`patch`), and a last peer 3:4 that checks nothing, all vouched for by the entry and the
    last peer: (swarm, entry, honest peers, liar, last)."""
    s = make_swarm(tiny_llama)
    entry = s.add("0:1", args=entry_args)
    good = [s.add("1:3") for _ in range(honest)]
    liar = s.add("1:3", patch=patch)
    last = s.add("3:4")
    s.wait_ready()
    size = len(s.peers)
    serving = lambda p: sum(r["vouched"] and r["status"] == "serving" for r in p.table()["peers"])  # noqa: E731
    wait_until(lambda: serving(entry) == size and serving(last) == size, 60, s._why)
    return s, entry, good, liar, last


def complete(peer, prompt, n_tokens, **extra) -> str:
    body = {"model": "llama", "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, **extra}
    r = httpx.post(f"{peer.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_liar_serving_tampered_weights_never_reaches_a_user(tiny_llama, make_swarm, monkeypatch):
    """A private swarm with a liar beside one honest replica of layers 1:3: an entry with
    --verify-rate 1 and --self-referee (no third replica exists: the entry recomputes disputed
    layers itself) and a last peer that checks nothing. Unchecked, users get the liar's text;
    checked, 50 of 50 greedy requests equal the monolithic model's, the liar is convicted, the
    accusation reaches the other peers, and nobody else is flagged."""
    monkeypatch.setenv("LAYERSWARM_SWARM_KEY", KEY.decode())  # every peer of this test inherits it
    prompts = [f"request {i}: {'abcdefghij'[i % 10] * (1 + i % 4)}" for i in range(50)]
    expected = texts(tiny_llama, prompts, 8)
    args = ["--verify-rate", "1", "--self-referee"]
    s, entry, honest, liar, last = liar_swarm(make_swarm, tiny_llama, args, TAMPERED_WEIGHTS)

    unchecked = [complete(last, p, 8) for p in prompts[:20]]
    assert sum(u != e for u, e in zip(unchecked, expected, strict=False)) > 0  # the attack works unchecked
    checked = [complete(entry, p, 8) for p in prompts]
    assert checked == expected  # 50 of 50
    stats = entry.health()["verification"]
    assert set(stats["convicted"]) == {liar.peer_id} and stats["requests"] == 50, stats
    wait_until(lambda: liar.peer_id in last.health()["verification"]["convicted"], 30, s._why)
    for p in [*honest, last]:
        assert set(p.health()["verification"]["convicted"]) <= {liar.peer_id}
    # consensus as a request option, at a peer that checks nothing by itself
    assert complete(last, prompts[0], 8, consensus=2) == expected[0]
    r = httpx.post(
        f"{last.url}/v1/completions",
        json={"model": "llama", "prompt": "x", "max_tokens": 2, "consensus": 9},
        timeout=30,
    )
    assert r.status_code == 400 and "consensus" in r.text, r.text


def test_two_replicas_that_disagree_fail_the_request_instead_of_guessing(tiny_llama):
    """One liar beside one honest replica and no third: no majority can be formed, so the
    request fails naming both suspects; the user gets no token of either."""
    from peers.transport.errors import SwarmUnavailable

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:1", "1:3", "1:3", "3:4"])
        entry, liar = nodes[0], nodes[2]
        tamper(liar.block)
        received = []
        try:
            with pytest.raises(SwarmUnavailable) as e:
                async for step in verified_generate(
                    entry, PROMPTS_50[0], 8, Sampling(temperature=0), frozenset()
                ):
                    received.append(step)
            return str(e.value), received, {n.peer_id for n in nodes[1:3]}, entry.verification
        finally:
            await stop_swarm(nodes)

    why, received, suspects, stats = asyncio.run(main())
    assert received == [] and "no other replica" in why and all(s in why for s in suspects), why
    assert stats.convicted == {}


CORRUPTS_WHAT_IT_SENDS = """
from dataclasses import replace
import peers.hop as hop
import peers.transport.forwarder as forwarding
hop.check_commitments = lambda *args, **kwargs: None  # a liar checks nothing
_push = forwarding.Forwarder.push
async def push(self, req):
    if not req.terminal and req.tensor.is_floating_point():
        req = replace(req, tensor=req.tensor + 0.5)  # after committing to the honest output
    return await _push(self, req)
forwarding.Forwarder.push = push
"""


def test_a_peer_sending_on_other_hidden_states_than_it_committed_to_is_caught(tiny_llama, make_swarm):
    """A liar that computes honestly (its shadow agrees) but sends the next hop something else:
    the next hop commits to what it received, which is not what the liar committed to sending;
    the entry fails over around the liar and the user gets the monolithic model's text. The
    prompts are ones whose routes go through the liar, so that each run tests the same thing."""
    from transformers import AutoTokenizer

    from peers.entry.prefix import routing_key
    from peers.swarm.routing import weight

    s, entry, (honest,), liar, last = liar_swarm(
        make_swarm, tiny_llama, ["--verify-rate", "1"], CORRUPTS_WHAT_IT_SENDS
    )
    tok = AutoTokenizer.from_pretrained(tiny_llama)

    def via_liar(prompt: str) -> bool:  # rendezvous hashing puts the liar on this prompt's route
        key = routing_key(tok.encode(prompt))
        return weight(key, liar.peer_id) > weight(key, honest.peer_id)

    prompts = [p for p in (f"link {i}: {'xyz' * (1 + i % 3)}" for i in range(64)) if via_liar(p)][:8]
    assert len(prompts) == 8
    expected = texts(tiny_llama, prompts, 6)
    unchecked = [complete(last, p, 6) for p in prompts]
    assert unchecked != expected  # the attack works unchecked
    assert [complete(entry, p, 6) for p in prompts] == expected
    log = entry.log_path.read_text(errors="replace")
    assert f"peer {liar.peer_id} failed" in log and "committed to another input" in log, log[-3000:]


def test_only_the_shadow_commitments_an_entry_asked_for_count():
    """A relaying hop cannot slip in a commitment of its making (to frame a peer), and a shadow
    fed another input than its hop is not compared with it."""
    from peers.transport.frames import Hop

    hop_id, shadow_id, other_id = Identity.generate(), Identity.generate(), Identity.generate()
    keys = {i.peer_id: i.public_key for i in (hop_id, shadow_id, other_id)}

    class Table:
        def get(self, peer_id):
            return type("E", (), {"public_key": keys[peer_id]}) if peer_id in keys else None

    x = torch.randn(1, 64)
    hop = commitment(x, identity=hop_id)
    honest = commitment(x * 1.5, identity=shadow_id)  # disagrees: a real dispute
    planned = (Hop(shadow_id.peer_id, "127.0.0.1:1", hop.start, hop.end),)
    assert checked_shadows(Table(), planned, [hop], [honest]) == (honest,)
    unplanned = commitment(x * 1.5, identity=other_id)
    other_input = Commitment(**{**honest.__dict__, "input_digest": "another", "signature": ""}).signed(
        shadow_id
    )
    forged = Commitment(**{**honest.__dict__, "values": ((9.0,) * 16,)})  # not what it signed
    assert checked_shadows(Table(), planned, [hop], [unplanned, other_input, forged]) == ()


def test_with_self_referee_an_entry_decides_between_two_replicas_itself(tiny_llama):
    """One liar beside one honest replica, and an entry started with --self-referee: on a
    disagreement the entry recomputes the disputed layers itself, convicts the liar and goes on
    with the monolithic model's tokens."""
    spans = ["0:1", "1:3", "1:3", "3:4"]
    lie = lambda node: tamper(node.block)  # noqa: E731
    got, expected, stats, liar = run_with_liar(
        tiny_llama, spans, 0, 2, lie, PROMPTS_50[40:46], 6, self_referee=True
    )
    assert got == expected
    assert set(stats.convicted) == {liar} and "this entry's own computation" in stats.convicted[liar]
