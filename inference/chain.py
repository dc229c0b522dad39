"""Blocks run in order in one process: the reference pipeline and the `peer generate` command.
The generate loop is plain functions: prefill, decode_one_token."""

import uuid
from collections.abc import Iterator, Sequence

import torch

from .block import Block
from .sampling import SamplingParams, sample

GREEDY = SamplingParams(temperature=0)


class LocalChain:
    """Blocks whose spans tile [0, L) in order, called one after the other."""

    def __init__(self, blocks: Sequence[Block]):
        assert blocks, "a chain needs at least one block"
        ends = [0] + [b.span.end for b in blocks]
        starts = [b.span.start for b in blocks]
        if starts != ends[:-1] or not blocks[-1].span.is_last:
            spans = ", ".join(str(b.span) for b in blocks)
            raise ValueError(f"blocks {spans} do not tile [0, {blocks[0].span.total}) in order")
        self.blocks = list(blocks)

    def forward(self, session_id: str, inputs: torch.Tensor, position: int, last_only: bool = True):
        x = inputs
        for block in self.blocks:
            x = block(session_id, x, position, last_only=last_only)
        return x  # logits [B, T', V]

    def close(self, session_id: str) -> None:
        for block in self.blocks:
            block.close(session_id)


def prefill(chain: LocalChain, session_id: str, ids: torch.Tensor) -> torch.Tensor:
    return chain.forward(session_id, ids, 0)[:, -1]  # [B, V]


def decode_one_token(chain: LocalChain, session_id: str, token: torch.Tensor, position: int):
    return chain.forward(session_id, token[:, None], position)[:, -1]  # [B, V]


def generate(
    chain: LocalChain,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams = GREEDY,
    eos_token_ids: frozenset[int] = frozenset(),
) -> Iterator[int]:
    """Yield new tokens of one sequence until max_new_tokens or an end-of-sequence token."""
    session_id = uuid.uuid4().hex
    try:
        ids = torch.tensor([prompt_ids])
        logits = prefill(chain, session_id, ids)
        position = len(prompt_ids)
        for step in range(max_new_tokens):
            token, _ = sample(logits, params, position)
            yield int(token[0])
            if int(token[0]) in eos_token_ids or step == max_new_tokens - 1:
                return
            logits = decode_one_token(chain, session_id, token, position)
            position += 1
    finally:
        chain.close(session_id)
