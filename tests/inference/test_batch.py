"""Continuous batching inside a block: steps of many sessions in one forward give what each gives
alone (fp32, CPU), whatever their lengths and however they are staggered."""

import pytest
import torch

from inference import SamplingParams, SessionError, load_block, sample
from inference.batch import Step
from inference.sampling import sample_many
from tests.helpers import greedy_reference, monolithic

PROMPTS = [[5, 17, 99, 42, 7, 3, 250, 64, 12, 8, 77], [9, 9, 1, 200, 31], [44] * 3, list(range(3, 40))]


def greedy_batched(blocks, prompts, max_new, starts):
    """Greedy tokens of several sessions run through `blocks` in batched steps; session i joins
    at step starts[i] (staggered arrivals: its prefill shares a forward with others' decodes)."""
    state = {i: None for i in range(len(prompts))}  # i -> (position, next input ids)
    tokens = {i: [] for i in range(len(prompts))}
    for tick in range(max(starts) + max_new + 1):
        steps = []
        for i, prompt in enumerate(prompts):
            if tick == starts[i]:
                state[i] = (0, prompt)
            if state[i] is not None and len(tokens[i]) < max_new:
                position, ids = state[i]
                steps.append((i, Step(f"s{i}", torch.tensor([ids]), position)))
        if not steps:
            continue
        x = [s for _, s in steps]
        for block in blocks:
            outs = block.forward_batch(x)
            assert not any(isinstance(o, Exception) for o in outs), outs
            x = [Step(s.session_id, o, s.position) for s, o in zip(x, outs, strict=True)]
        for (i, s), step in zip(steps, x, strict=True):
            token = int(step.inputs[0, -1].argmax())
            tokens[i].append(token)
            state[i] = (s.position + s.inputs.shape[1], [token])
    return [tokens[i] for i in range(len(prompts))]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_staggered_sessions_batched_equal_each_alone(tiny_models, kind):
    path = tiny_models[kind]
    model = monolithic(path)
    blocks = [load_block(path, span) for span in ("0:1", "1:3", "3:4")]
    got = greedy_batched(blocks, PROMPTS, 24, starts=[0, 0, 3, 7])
    assert got == [greedy_reference(model, p, 24) for p in PROMPTS]


def test_batched_logits_match_one_at_a_time(tiny_llama):
    together, alone = load_block(tiny_llama), load_block(tiny_llama)
    steps = [Step(f"s{i}", torch.tensor([p]), 0, last_only=False) for i, p in enumerate(PROMPTS)]
    outs = together.forward_batch(steps)
    for step, out in zip(steps, outs, strict=True):
        ref = alone.forward(step.session_id, step.inputs, 0, last_only=False)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_a_refused_step_leaves_the_others_untouched(tiny_llama):
    block = load_block(tiny_llama)
    outs = block.forward_batch(
        [Step("ok", torch.tensor([PROMPTS[0]]), 0), Step("never-opened", torch.tensor([[3]]), 5)]
    )
    assert isinstance(outs[1], SessionError)
    assert outs[0].shape == (1, 1, 256)
    assert block.sessions.get("ok").length == len(PROMPTS[0])


def test_a_layer_run_without_the_cache_is_an_error(tiny_llama):
    """Older transformers releases took the KV cache as `past_key_values` and swallowed `cache`:
    decoding would silently run without it."""
    block = load_block(tiny_llama)
    layer = block.layers[1]
    original = layer.forward
    layer.forward = lambda *args, cache=None, **kwargs: original(*args, **kwargs)
    with pytest.raises(RuntimeError, match="without this step's KV cache"):
        block.forward("s", torch.tensor([PROMPTS[0]]), 0)


def test_one_prompt_widens_into_several_sequences(tiny_llama):
    """n > 1: the prompt is computed once, then each row continues on its own."""
    model = monolithic(tiny_llama)
    block = load_block(tiny_llama)
    prompt = PROMPTS[0]
    logits = block.forward("n", torch.tensor([prompt]), 0)[:, -1]  # [1, V]
    first = logits.argmax(-1)
    rows = torch.stack([first, (first + 1) % 256], dim=0)  # two different continuations [2, 1]
    position = len(prompt)
    got = [[int(rows[0, 0])], [int(rows[1, 0])]]
    for _ in range(8):
        logits = block.forward("n", rows, position)[:, -1]
        position += 1
        rows = logits.argmax(-1)[:, None]
        for b in range(2):
            got[b].append(int(rows[b, 0]))
    for b in range(2):
        expected = greedy_reference(model, prompt + got[b][:1], 8)
        assert got[b][1:] == expected


def test_sample_many_equals_sample_per_session():
    torch.manual_seed(0)
    logits = [torch.randn(1, 50), torch.randn(2, 50), torch.randn(1, 50)]
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, seed=3),
        SamplingParams(top_p=0.5, seed=1),
    ]
    steps = [4, 9, 2]
    for (tokens, logprobs), x, p, s in zip(
        sample_many(logits, params, steps), logits, params, steps, strict=True
    ):
        ref_tokens, ref_logprobs = sample(x, p, s)
        assert torch.equal(tokens, ref_tokens)
        assert torch.allclose(logprobs, ref_logprobs)


def test_token_ids_outside_the_vocabulary_are_refused_alone(tiny_llama):
    block = load_block(tiny_llama)
    outs = block.forward_batch(
        [Step("ok", torch.tensor([PROMPTS[1]]), 0), Step("bad", torch.tensor([[3, 10**6]]), 0)]
    )
    assert isinstance(outs[1], ValueError) and "token ids must be in [0, 256)" in str(outs[1])
    assert outs[0].shape == (1, 1, 256)


def test_a_tiny_temperature_is_greedy_not_an_overflow():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    tokens, _ = sample(logits, SamplingParams(temperature=1e-30, seed=1), 0)
    assert tokens.tolist() == [1]
