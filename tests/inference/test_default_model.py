"""The real default model, split in three, gives the monolithic model's greedy tokens."""

import pytest

from inference import LocalChain, Tokenizer, generate, load_block
from tests.helpers import greedy_reference, monolithic

pytestmark = pytest.mark.slow


def test_three_blocks_match_monolithic_greedy(default_model):
    tokenizer = Tokenizer(default_model)
    prompts = [
        tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
        tokenizer.encode("The three primary colors are"),
        tokenizer.encode("def fibonacci(n):"),
    ]
    model = monolithic(default_model)
    chain = LocalChain([load_block(default_model, span) for span in ("0:10", "10:20", "20:30")])
    for prompt in prompts:
        assert list(generate(chain, prompt, 32)) == greedy_reference(model, prompt, 32)
