"""Sampling as plain functions: greedy, temperature, top-k, top-p, seeded per step so that the
same seed gives the same tokens whichever peer samples."""

from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-5
_MIX = 0x9E3779B97F4A7C15  # odd constant spreading (seed, step) over the generator's seed space


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None

    def __post_init__(self):
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        """Temperatures below MIN_TEMPERATURE are greedy: dividing logits by them overflows."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def step_generator(seed: int | None, step: int) -> torch.Generator | None:
    """A generator for one decoding step: a pure function of (seed, step)."""
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * _MIX + step) % (1 << 63))


def sample(logits: torch.Tensor, params: SamplingParams, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B], logprobs [B]); the logprob is under the unmodified model."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    if params.greedy:
        tokens = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(_filtered(logits / params.temperature, params), dim=-1)
        tokens = torch.multinomial(probs.cpu(), 1, generator=step_generator(params.seed, step))[:, 0]
        tokens = tokens.to(logits.device)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def _filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Mask out tokens outside top-k and outside the top-p nucleus (always keeps the best one)."""
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # mass before >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_many(
    logits: list[torch.Tensor], params: list[SamplingParams], steps: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sample the next tokens of many sessions at once: logits [B_i, V] each -> (tokens [B_i],
    logprobs [B_i]) each. One log-softmax and one argmax for all rows; sampled sessions draw
    from their own (seed, step) generator, so a session's tokens do not depend on its batch."""
    sizes = [x.shape[0] for x in logits]
    flat = torch.cat(logits).float()  # [sum B_i, V]
    logprobs = torch.log_softmax(flat, dim=-1).split(sizes)
    best = flat.argmax(dim=-1).split(sizes)
    out = []
    for x, p, step, lp, top in zip(logits, params, steps, logprobs, best, strict=True):
        if p.greedy:
            tokens = top
        else:
            probs = torch.softmax(_filtered(x.float() / p.temperature, p), dim=-1)
            tokens = torch.multinomial(probs.cpu(), 1, generator=step_generator(p.seed, step))[:, 0]
            tokens = tokens.to(x.device)
        out.append((tokens, lp.gather(-1, tokens[:, None])[:, 0]))
    return out
