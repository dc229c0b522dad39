"""Prompt logprobs through a swarm: the last peer scores every prompt position in the prefill (in
chunks, under any split, for one sequence or several), and the scores equal the monolithic
model's log-softmax; a scored step reuses no prefix, and frames or replies that break the rules
are refused."""

import asyncio
from dataclasses import replace

import pytest
import torch

from inference.sampling import Score
from inference.scheduler import SchedulerSettings
from peers.entry.generation import generate
from peers.entry.session import Prefill
from peers.transport.errors import HopFailed
from peers.transport.frames import Hop, ProtocolError, Sampling, StepRequest, decode_step, encode_step
from peers.transport.results import outcome_of
from tests.helpers import monolithic
from tests.peers.test_inprocess import start_swarm, stop_swarm

PROMPT = [5, 17, 99, 42, 7, 3, 250, 64, 12, 8, 77, 9, 9, 1, 200, 31, 44, 44, 44, 3, 4, 5, 6]  # 23
TOP = 5
SPLITS = [["0:1", "1:2", "2:4"], ["0:2", "2:3", "3:4"], ["0:1", "1:3", "3:4"]]
SMALL_CHUNKS = {"scheduler": SchedulerSettings(prefill_chunk=8)}  # the prompt: three chunks


def reference(model, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The monolithic model's logprob of each prompt token after the first, their ranks, and
    the TOP likeliest tokens at each position."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, :-1].float()  # [L - 1, V]
    lps = torch.log_softmax(logits, dim=-1)
    chosen = lps.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    ranks = (lps > chosen[:, None]).sum(-1) + 1
    return chosen, ranks, lps.topk(TOP, dim=-1).indices


async def scored(node, prompt: list[int], n: int = 1, top: int | None = TOP) -> tuple[Prefill, list]:
    scores, tokens = Prefill(top), []
    sampling = Sampling(temperature=0)
    async for step in generate(node, prompt, 3, sampling, frozenset(), n, prefill=scores):
        tokens.append([t.token for t in step])
    return scores, tokens


def assert_equal_to(scores: Prefill, expected) -> None:
    chosen, ranks, top = expected
    got = scores.positions
    assert got is not None and len(got) == len(chosen)
    assert torch.allclose(torch.tensor([p.logprob for p in got]), chosen, atol=1e-4)
    assert [p.rank for p in got] == ranks.tolist()
    assert [[t for t, _ in p.top] for p in got] == top.tolist()


@pytest.mark.parametrize("spans", SPLITS, ids=lambda s: ",".join(s))
def test_prompt_scores_equal_the_monolithic_log_softmax(tiny_llama, spans):
    expected = reference(monolithic(tiny_llama), PROMPT)

    async def main():
        net, nodes = await start_swarm(tiny_llama, spans, settings={i: SMALL_CHUNKS for i in range(3)})
        try:
            one = await scored(nodes[0], PROMPT)
            two = await scored(nodes[1], PROMPT, n=2)  # the prompt but its last token, then that one twice
            plain = [s async for s in generate(nodes[0], PROMPT, 3, Sampling(temperature=0), frozenset())]
            return one, two, [[t.token for t in s] for s in plain]
        finally:
            await stop_swarm(nodes)

    (one, tokens), (two, tokens2), plain = asyncio.run(main())
    assert_equal_to(one, expected)
    assert_equal_to(two, expected)
    assert tokens == plain and [t[0] for t in tokens2] == [t[0] for t in plain]  # scoring changes no token


def test_a_scored_prompt_is_computed_whole_where_its_prefix_is_cached(tiny_llama):
    """A prompt seen before has its prefix cached on the peers: a plain request reuses it (and
    says how many tokens were cached), a scored one computes every position (cached: 0) and its
    scores cover them all."""
    prompt = PROMPT * 4  # long enough for cached prefix blocks
    expected = reference(monolithic(tiny_llama), prompt)
    cache = {"prefix_cache_tokens": 4096}

    async def main():
        net, nodes = await start_swarm(tiny_llama, ["0:2", "2:4"], settings={0: cache, 1: cache})
        try:
            first, _ = await scored(nodes[0], prompt, top=None)  # the prefix is cached from here on
            again, _ = await scored(nodes[0], prompt, top=None)
            return first, again, (await scored(nodes[0], prompt))[0]
        finally:
            await stop_swarm(nodes)

    first, again, scores = asyncio.run(main())
    assert first.cached_tokens == 0 and 0 < again.cached_tokens < len(prompt)
    assert first.positions is None and scores.cached_tokens == 0
    assert_equal_to(scores, expected)


def _scored_frame(**score) -> StepRequest:
    return StepRequest(
        session_id="s",
        position=0,
        hops=[Hop("p", "127.0.0.1:1", 0, 4)],
        sampling=Sampling(),
        tensor=torch.tensor([[1, 2, 3]]),
        score=Score(**score),
    )


def test_a_frame_scores_at_most_its_positions_and_reuses_no_prefix():
    frame = _scored_frame(targets=(2, 3), top=2)
    assert decode_step(encode_step(frame)).score == frame.score
    for bad in (
        _scored_frame(targets=(2, 3, 4, 5)),  # more targets than positions
        _scored_frame(targets=(2,), top=21),  # more alternatives than any logprobs get
        _scored_frame(targets=(-1,)),
    ):
        with pytest.raises(ProtocolError):
            decode_step(encode_step(bad))
    with pytest.raises(ProtocolError, match="reuses no prefix"):
        decode_step(encode_step(replace(frame, prefix=(123,))))


@pytest.mark.parametrize(
    "prompt_logprobs",
    [
        [[0.5, 1, []]],  # a logprob above 0
        [[-0.5, 0, []]],  # rank 0
        [[-0.5, 1, [[3, 0.1]]]],
        [[-0.5, 1, [[3, -0.1]] * 21]],
        [["x", 1, []]],
        {"0": -0.5},
    ],
)
def test_a_reply_with_bad_prompt_logprobs_is_a_wrong_answer(prompt_logprobs):
    body = {"tokens": [1], "logprobs": [-0.1], "prompt_logprobs": prompt_logprobs}
    failure = outcome_of(body, "p")
    assert isinstance(failure, HopFailed) and "prompt_logprobs" in failure.message
