"""Sampling: greedy, seeded reproducibility, top-k/top-p cuts."""

import pytest
import torch

from inference import SamplingParams, sample


def logits():
    return torch.randn(3, 500, generator=torch.Generator().manual_seed(1))


def test_greedy_is_argmax_with_its_logprob():
    x = logits()
    tokens, lp = sample(x, SamplingParams(temperature=0), step=0)
    assert tokens.tolist() == x.argmax(-1).tolist()
    assert torch.allclose(lp, torch.log_softmax(x, -1).max(-1).values)


def test_same_seed_same_tokens_different_seeds_differ():
    x = logits()

    def draw(seed):
        return [sample(x, SamplingParams(temperature=1.0, seed=seed), s)[0].tolist() for s in range(8)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_and_top_p_keep_only_allowed_tokens():
    x = logits()
    allowed_k = set(torch.topk(x[0], 5).indices.tolist())
    for step in range(50):
        t, _ = sample(x[:1], SamplingParams(temperature=2.0, top_k=5, seed=1), step)
        assert int(t) in allowed_k
    # Probabilities 0.5, 0.3, 0.1, 0.1: with top_p=0.7 the nucleus is {0, 1} (the mass before token 2
    # is 0.8 >= 0.7), yet tokens 2 and 3 carry 20% of the mass, so without the cut about 40 of 200
    # draws would land outside it.
    spread = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()
    seen = [int(sample(spread, SamplingParams(top_p=0.7, seed=s), 0)[0]) for s in range(200)]
    assert set(seen) == {0, 1}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2)])
def test_invalid_parameters_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
