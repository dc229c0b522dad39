"""A chain of blocks reproduces the monolithic transformers model."""

import pytest
import torch

from inference import LocalChain, SessionError, generate, load_block
from inference.batch import Step
from tests.helpers import greedy_reference, monolithic

SPLITS = [
    ("0:4",),  # one block holding everything
    ("0:1", "1:2", "2:3", "3:4"),  # one-layer blocks
    ("0:1", "1:3", "3:4"),
    ("0:3", "3:4"),
]
PROMPT = [5, 17, 99, 42, 7, 3, 250, 64, 12, 8, 77]


def chain_of(path, split):
    return LocalChain([load_block(path, span) for span in split])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: ",".join(s))
def test_prefill_logits_and_greedy_tokens_match_monolithic(tiny_models, kind, split):
    path = tiny_models[kind]
    model = monolithic(path)
    chain = chain_of(path, split)
    ids = torch.tensor([PROMPT, PROMPT[::-1]])  # [B=2, T]
    with torch.no_grad():
        expected = model(ids).logits
    got = chain.forward("prefill", ids, 0, last_only=False)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()

    tokens = list(generate(chain, PROMPT, 32))
    assert tokens == greedy_reference(model, PROMPT, 32)


def test_interleaved_sessions_do_not_disturb_each_other(tiny_llama):
    model = monolithic(tiny_llama)
    chain = chain_of(tiny_llama, ("0:2", "2:4"))
    prompts = [PROMPT, [9, 9, 1, 200, 31]]
    expected = [greedy_reference(model, p, 16) for p in prompts]
    gens = [generate(chain, p, 16) for p in prompts]
    got = [[], []]
    for _ in range(16):  # alternate one token of each session at a time
        for i, gen in enumerate(gens):
            got[i].append(next(gen))
    assert got == expected


def test_batch_of_sequences_in_one_session(tiny_llama):
    model = monolithic(tiny_llama)
    chain = chain_of(tiny_llama, ("0:1", "1:4"))
    prompts = [PROMPT, PROMPT[::-1]]
    expected = [greedy_reference(model, p, 12) for p in prompts]
    logits = chain.forward("batch", torch.tensor(prompts), 0)[:, -1]
    got = []
    for step in range(12):
        token = logits.argmax(-1)  # [B]
        got.append(token.tolist())
        logits = chain.forward("batch", token[:, None], len(PROMPT) + step)[:, -1]
    assert [list(seq) for seq in zip(*got, strict=True)] == expected


def test_prefill_in_chunks_equals_one_prefill(tiny_models):
    """A multi-token step on top of a cache (what a replay continuing a session does)."""
    path = tiny_models["mistral"]  # sliding window 6: the chunk's mask must respect it
    chain = chain_of(path, ("0:2", "2:4"))
    ids = torch.tensor([PROMPT])
    whole = chain.forward("whole", ids, 0, last_only=False)
    chain.forward("chunks", ids[:, :4], 0)
    tail = chain.forward("chunks", ids[:, 4:], 4, last_only=False)
    assert torch.allclose(tail, whole[:, 4:], atol=1e-5), (tail - whole[:, 4:]).abs().max()


def test_step_at_wrong_position_is_refused(tiny_llama):
    block = load_block(tiny_llama, "0:2")
    block("s", torch.tensor([PROMPT]), 0)
    with pytest.raises(SessionError, match="holds 11 positions of batch 1 for layers 0:2"):
        block("s", torch.tensor([[1]]), 12)  # past what it holds
    with pytest.raises(SessionError, match="unknown session"):
        block("nope", torch.tensor([[1]]), 3)
    assert block.close("s") and not block.close("s")


def test_block_rejects_wrong_input_kind(tiny_llama):
    first, middle = load_block(tiny_llama, "0:2"), load_block(tiny_llama, "2:4")
    with pytest.raises(ValueError, match="take hidden states"):
        middle("s", torch.tensor([PROMPT]), 0)
    with pytest.raises(ValueError, match="take token ids"):
        first("s", torch.zeros(1, 3, 64), 0)


def test_a_step_inside_a_drafted_step_drops_the_positions_after_it(tiny_llama):
    """Rejected drafts: after a drafted step of positions 8..10, a step that starts at 9 goes on
    from the first 9 positions, exactly as a session that never held the rest; a step may not
    go back further, nor after a step that drafted nothing (no frame rewinds a session)."""
    chain = load_block(tiny_llama)
    ids = torch.tensor([PROMPT])  # 11 positions
    chain.forward("d", ids[:, :8], 0)
    (out,) = chain.forward_batch([Step("d", ids[:, 8:], 8, drafted=True)])
    rewound = chain.forward("d", torch.tensor([[1, 2]]), 9, last_only=False)
    fresh = chain.forward("fresh", torch.tensor([PROMPT[:9] + [1, 2]]), 0, last_only=False)
    assert torch.allclose(rewound, fresh[:, 9:], atol=1e-5), (rewound - fresh[:, 9:]).abs().max()
    assert chain.sessions.get("d").length == 11
    with pytest.raises(SessionError, match="holds 11 positions"):
        chain.forward("d", torch.tensor([[3]]), 10)  # the last step drafted nothing
    chain.forward("e", ids[:, :8], 0)
    chain.forward_batch([Step("e", ids[:, 8:], 8, drafted=True)])
    with pytest.raises(SessionError, match="holds 11 positions"):
        chain.forward("e", torch.tensor([[3]]), 8)  # before the drafted positions
    assert chain.forward("e", torch.tensor([[3]]), 5, rewind=True).shape[1] == 1  # its owner may
