"""Speculative decoding: drafts by prompt lookup, checked by the whole chain in one step. The
output equals plain decoding (greedy and seeded), stop ids and max_tokens hold when several
tokens arrive at once, and a peer lost during a drafted step is failed over exactly."""

import asyncio

import pytest
import torch

import peers.entry.speculative
from peers.config import NodeConfig
from peers.entry.generation import generate
from peers.entry.speculative import PAUSE_AFTER_MISSES, Drafter, accepted_length
from peers.node import PeerNode
from peers.transport.frames import (
    MAX_DRAFT,
    Hop,
    ProtocolError,
    Sampling,
    StepRequest,
    decode_step,
    encode_step,
)
from tests.helpers import greedy_reference, monolithic, save_tiny_model
from tests.peers.test_inprocess import PROMPTS, start_swarm, stop_swarm

LOOPING = [[5, 6, 7, 8] * 6, [40, 41, 42, 43, 44, 45, 46] * 3 + [40, 41]]


# -- the drafter ----------------------------------------------------------------------------
def test_prompt_lookup_drafts_what_followed_the_latest_occurrence():
    d = Drafter([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 8, 1, 2, 3])
    assert d.propose(8) == [5, 6, 7, 8]  # after the latest "1 2 3" (K_START tokens)
    assert d.propose(2) == [5, 6]  # never more than the limit
    assert Drafter([1, 2, 3, 4]).propose(8) == []  # the last n-gram never occurred before
    d = Drafter([1, 2, 3, 9, 2, 3])
    assert d.propose(8) == []  # two tokens are too few to look up
    d = Drafter([1, 2, 3, 1, 2])
    d.extend([3])
    assert d.propose(8) == [1, 2, 3, 1]  # a repeat repeats on


def test_a_copy_goes_on_past_an_edited_token():
    source = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    d = Drafter([*source, 99, 10, 11, 12])
    assert d.propose(8) == [13, 14, 15, 16]
    d.record(4, 2)  # 13, 14 kept; the model wrote 50 where the passage has 15 (an edit)
    d.extend([13, 14, 50])
    assert d.propose(8) == [16, 17, 18]  # on from past the edited token, though "14 50" is new
    d.record(3, 0)  # the copy ended: back to n-gram lookup
    d.extend([77])
    assert d.propose(8) == []


def test_the_draft_length_follows_acceptance_and_pauses_on_misses():
    d = Drafter([1, 2, 3] * 20, k_max=8)
    assert len(d.propose(100)) == 4
    d.record(4, 4)
    assert len(d.propose(100)) == 6  # all kept: more
    d.record(6, 1)
    assert len(d.propose(100)) == 2  # as many as were kept, plus one
    for _ in range(PAUSE_AFTER_MISSES):
        d.record(2, 0)
    assert [d.propose(100) for _ in range(4)] == [[]] * 4  # a pause of four plain steps
    assert d.propose(100) != []


def test_accepted_length():
    assert accepted_length([4, 5, 6], [4, 5, 6, 7]) == 3
    assert accepted_length([4, 5, 6], [4, 9, 6, 7]) == 1
    assert accepted_length([4], [3, 1]) == 0


# -- the frame ---------------------------------------------------------------------------------
def _frame(tensor, draft, verify="", position=3, prefix=()):
    hops = [Hop("a", "127.0.0.1:1", 0, 4)]
    return StepRequest("s", position, hops, Sampling(), tensor, prefix, verify=verify, draft=draft)


def test_a_drafted_frame_travels_and_bad_drafts_are_refused():
    req = decode_step(encode_step(_frame(torch.tensor([[1, 2, 3]]), 2)))
    assert req.draft == 2
    three = torch.tensor([[1, 2, 3]])
    for frame in [
        _frame(three, 3),  # as many drafted as positions: nothing to follow
        _frame(torch.tensor([[1, 2, 3], [4, 5, 6]]), 1),  # several sequences
        _frame(torch.tensor([list(range(MAX_DRAFT + 2))]), MAX_DRAFT + 1),  # too many
        _frame(three, -1),
        _frame(three, 1, verify="digest"),  # a checked step
        _frame(three, 1, position=0),  # a prompt
        _frame(three, 1, prefix=(5,)),  # a step with a reused prefix (its first hop may skip positions)
    ]:
        with pytest.raises(ProtocolError):
            decode_step(encode_step(frame))


# -- through a swarm ---------------------------------------------------------------------------
class Oracle:
    """A drafter that drafts the known continuation, wrong at every fifth token, so that every
    decode step drafts and some drafts are rejected."""

    def __init__(self, truth: dict[tuple, list[int]]):
        self.truth = truth

    def __call__(self, context):
        oracle = self

        class Drafting(Drafter):
            def propose(self, limit):
                for prompt, continuation in oracle.truth.items():
                    n = len(prompt)
                    if tuple(self.tokens[:n]) == prompt:
                        done = len(self.tokens) - n
                        out = continuation[done : done + min(limit, 6)]
                        return [t if (done + i) % 5 != 3 else (t + 1) % 256 for i, t in enumerate(out)]
                return []

        return Drafting(context)


GREEDY = Sampling(temperature=0)


async def _tokens(node, prompt, n, sampling=GREEDY, stop=frozenset(), on_token=None):
    out = []
    async for step in generate(node, prompt, n, sampling, stop, speculative=True):
        assert len(step) == 1
        out.append(step[0].token)
        if on_token:
            on_token(len(out))
    return out


def test_greedy_with_prompt_lookup_equals_monolithic_under_concurrency(tiny_llama, monkeypatch):
    monkeypatch.setattr(
        peers.entry.speculative, "MIN_NGRAM", 1
    )  # a random model's text repeats single tokens only
    model = monolithic(tiny_llama)
    prompts = PROMPTS + LOOPING
    expected = [greedy_reference(model, p, 24) for p in prompts]

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:1", "1:3", "3:4"])
        try:
            got = await asyncio.gather(*(_tokens(nodes[0], p, 24) for p in prompts))
            return got, nodes[0].speculation, [n.block.open_sessions() for n in nodes]
        finally:
            await stop_swarm(nodes)

    got, stats, _ = asyncio.run(main())
    assert got == expected
    assert stats.drafted > 0, (
        stats
    )  # (a random model rarely repeats: its drafts are rejected and rolled back)


def test_drafted_steps_give_the_same_tokens_greedy_and_seeded(tiny_llama, monkeypatch):
    model = monolithic(tiny_llama)
    prompts = PROMPTS[:4]
    greedy = {tuple(p): greedy_reference(model, p, 20) for p in prompts}
    seeded = Sampling(temperature=0.9, top_p=0.95, seed=1234)

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:2", "2:4"])
        entry = nodes[0]
        try:
            plain = []
            for p in prompts:  # seeded, without speculation
                plain.append([t[0].token async for t in generate(entry, p, 20, seeded, frozenset())])
            monkeypatch.setattr(peers.entry.speculative, "Drafter", Oracle(greedy))
            got_greedy = await asyncio.gather(*(_tokens(entry, p, 20) for p in prompts))
            steps = entry.speculation.steps
            monkeypatch.setattr(
                peers.entry.speculative, "Drafter", Oracle(dict(zip(greedy, plain, strict=True)))
            )
            got_seeded = await asyncio.gather(*(_tokens(entry, p, 20, seeded) for p in prompts))
            return plain, got_greedy, got_seeded, steps, entry.speculation
        finally:
            await stop_swarm(nodes)

    plain, got_greedy, got_seeded, greedy_steps, stats = asyncio.run(main())
    assert got_greedy == list(greedy.values())
    assert got_seeded == plain
    assert 0 < greedy_steps < stats.steps and 0 < stats.accepted < stats.drafted, stats
    assert greedy_steps < len(prompts) * 20 // 2  # several tokens a step


def test_max_tokens_and_stop_ids_hold_when_several_tokens_arrive_at_once(tiny_llama, monkeypatch):
    model = monolithic(tiny_llama)
    prompt = PROMPTS[0]
    ref = greedy_reference(model, prompt, 20)
    stop = ref[6]
    first = ref.index(stop)

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:2", "2:4"])
        monkeypatch.setattr(peers.entry.speculative, "Drafter", Oracle({tuple(prompt): ref}))
        try:
            capped = await _tokens(nodes[0], prompt, 7)
            stopped = await _tokens(nodes[0], prompt, 20, stop=frozenset({stop}))
            return capped, stopped, nodes[0].speculation
        finally:
            await stop_swarm(nodes)

    capped, stopped, stats = asyncio.run(main())
    assert capped == ref[:7]
    assert stopped == ref[: first + 1]
    assert stats.accepted > 0


def test_a_peer_lost_during_a_drafted_step_is_failed_over_exactly(tiny_llama, monkeypatch):
    model = monolithic(tiny_llama)
    prompts = PROMPTS[:4]
    expected = [greedy_reference(model, p, 20) for p in prompts]
    monkeypatch.setattr(
        peers.entry.speculative, "Drafter", Oracle(dict(zip(map(tuple, prompts), expected, strict=True)))
    )

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:4", "0:2", "0:2", "2:4"])  # entry, 2 replicas, tail
        entry, replicas = nodes[0], nodes[1:3]
        dropped = []

        def drop(count):
            if count >= 6 and not dropped:  # every decode step drafts: the next one is lost
                victim = max(replicas, key=lambda n: n.block.open_sessions())
                assert victim.block.open_sessions() > 0
                net.down.add(victim.config.address)
                dropped.append(victim)

        try:
            entry.bans.ban(entry.peer_id, entry.table.me.incarnation)  # keep the entry off routes
            got = await asyncio.gather(*(_tokens(entry, p, 20, on_token=drop) for p in prompts))
            return got, entry.failovers, dropped, entry.speculation
        finally:
            await stop_swarm(nodes)

    got, failovers, dropped, stats = asyncio.run(main())
    assert dropped and failovers >= 1
    assert got == expected
    assert stats.accepted > 0


@pytest.mark.parametrize("draft", ["itself", "another model"])
def test_a_draft_model_drafts_where_lookup_finds_nothing_and_the_text_is_exact(tiny_llama, tmp_path, draft):
    model = monolithic(tiny_llama)
    expected = [greedy_reference(model, p, 16) for p in PROMPTS[:4]]
    # the model as its own draft model keeps its drafts (a real one is smaller); another random
    # model's drafts are mostly rejected, and its own KV cache rolls back each time
    path = tiny_llama if draft == "itself" else save_tiny_model("llama", tmp_path / "draft", seed=1)

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:2", "2:4"], settings={0: {"draft_model": str(path)}})
        entry = nodes[0]
        try:
            got = await asyncio.gather(*(_tokens(entry, p, 16) for p in PROMPTS[:4]))
            for _ in range(100):  # (sessions are closed in the background)
                if not len(entry.draft_block.sessions):
                    break
                await asyncio.sleep(0.02)
            return got, entry.speculation, len(entry.draft_block.sessions)
        finally:
            await stop_swarm(nodes)

    got, stats, draft_sessions = asyncio.run(main())
    assert got == expected
    if draft == "itself":
        assert stats.accepted > 0.8 * stats.drafted > 0, stats
        assert stats.steps < 4 * 16 // 2  # several tokens a step
    else:
        assert stats.drafted > stats.accepted and stats.steps > 4, stats
    assert draft_sessions == 0  # every request's draft session was closed


def test_a_draft_model_with_another_tokenizer_is_refused(tiny_llama, tmp_path):
    other = save_tiny_model("llama", tmp_path / "other", vocab_size=300)
    with pytest.raises(ValueError, match="must share the served model's tokenizer"):
        node = PeerNode(NodeConfig(model=str(tiny_llama), layers="0:4", draft_model=str(other)))
        node._load_draft_model()
    with pytest.raises(ValueError, match="no use without speculative decoding"):
        NodeConfig(model=str(tiny_llama), draft_model=str(tiny_llama), speculative=False)
