"""Sampling as plain functions: greedy, temperature, top-k, top-p, min-p, seeded per step so that
the same seed gives the same tokens whichever peer samples; and the logit controls applied before
it (logit bias, repetition/presence/frequency penalties, banned tokens, a grammar's token mask)."""

from dataclasses import dataclass, fields

import numpy as np
import torch

MIN_TEMPERATURE = 1e-5
COMMIT_K = 16  # entries of a row a hop commits to (peers/swarm/commitments.py)
_MIX = 0x9E3779B97F4A7C15  # odd constant spreading (seed, step) over the generator's seed space


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest one (after temperature)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output (as in HF)

    def __post_init__(self):
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for token, bias in self.logit_bias:
            if token < 0 or not -100 <= bias <= 100:
                raise ValueError(
                    f"logit_bias takes token ids >= 0 and biases in [-100, 100], got {token}: {bias}"
                )

    @property
    def modifies_logits(self) -> bool:
        return (
            bool(self.logit_bias)
            or (self.presence_penalty, self.frequency_penalty) != (0, 0)
            or (self.repetition_penalty != 1)
        )

    @property
    def greedy(self) -> bool:
        """Temperatures below MIN_TEMPERATURE are greedy: dividing logits by them overflows."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


@dataclass(frozen=True)
class RowControls:
    """What one sampled row's logits get besides the request's fixed parameters: the state of its
    sequence so far (penalties), the tokens it may not take now (min_tokens), and a grammar's
    mask of the tokens it may take (structured output)."""

    counts: tuple[tuple[int, int], ...] = ()  # generated token -> times (presence/frequency)
    context: tuple[int, ...] = ()  # the prompt's tokens (the repetition penalty covers them too)
    banned: tuple[int, ...] = ()
    mask: bytes | None = None  # allowed tokens: bit i of the little-endian int32 word i // 32

    @property
    def empty(self) -> bool:
        return not (self.counts or self.context or self.banned) and self.mask is None


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    prompt_tokens: tuple[int, ...] = ()  # with a repetition penalty: the prompt's distinct tokens
    top_logprobs: int = 0  # the last peer answers this many likeliest tokens per sampled one

    def params(self) -> SamplingParams:
        """What the sampler takes (below); raises ValueError when out of range."""
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(SamplingParams)})

    @property
    def steered(self) -> bool:
        """Anything besides temperature, top-k/p and the seed decides the token."""
        return self.params().modifies_logits or self.min_p > 0


@dataclass(frozen=True)
class Score:
    """Prompt logprobs asked of the last peer: `targets[j]` is the token that follows the step's
    j-th position (at most one per position); each gets its logprob, its rank in the vocabulary
    and the `top` likeliest tokens there, from the unmodified model's logits."""

    targets: tuple[int, ...]
    top: int = 0


@dataclass(frozen=True)
class PositionScore:
    """One scored position: the logprob of the token that follows it, that token's rank (1: the
    likeliest) and the likeliest tokens with their logprobs."""

    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Controls:
    """What the last peer applies to one sampled row's logits besides the request's sampling
    parameters, as the entry sends it: the tokens its sequence generated so far and how often
    (penalties), the tokens it may not take now (min_tokens), and the packed mask of the tokens
    a grammar allows (inference/grammar.py's pack_mask; unpacked where the vocabulary is known)."""

    counts: tuple[tuple[int, int], ...] = ()
    banned: tuple[int, ...] = ()
    mask: str | None = None


def controlled(
    logits: torch.Tensor, params: SamplingParams, rows: list[RowControls | None] | None
) -> torch.Tensor:
    """logits [B, V] -> a float32 copy with the logit bias, the penalties, the banned tokens and
    the grammar masks applied (row b gets rows[b]); token ids must lie in [0, V)."""
    out = logits.float().clone()
    vocab = out.shape[-1]

    def ids(tokens) -> torch.Tensor:
        t = torch.tensor(list(tokens), dtype=torch.long, device=out.device)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise ValueError(f"a token id outside [0, {vocab}) in the sampling controls")
        return t

    if params.logit_bias:
        tokens, bias = ids(t for t, _ in params.logit_bias), [b for _, b in params.logit_bias]
        out[:, tokens] += torch.tensor(bias, dtype=out.dtype, device=out.device)
    for b, row in enumerate(rows or ()):
        if row is None:
            continue
        x = out[b]
        if params.repetition_penalty != 1 and (row.counts or row.context):
            seen = ids({*row.context, *(t for t, _ in row.counts)})
            v = x[seen]
            x[seen] = torch.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
        if row.counts and (params.presence_penalty or params.frequency_penalty):
            tokens = ids(t for t, _ in row.counts)
            times = torch.tensor([c for _, c in row.counts], dtype=out.dtype, device=out.device)
            x[tokens] -= params.presence_penalty + params.frequency_penalty * times
        if row.banned:
            x[ids(row.banned)] = float("-inf")
        if row.mask is not None:
            x.masked_fill_(~allowed(row.mask, vocab).to(x.device), float("-inf"))
        if not torch.isfinite(x).any():
            raise ValueError("the sampling controls left no token to choose")
    return out


def allowed(mask: bytes, vocab: int) -> torch.Tensor:
    """A packed token bitmask -> bool [vocab]; a mask too short for the vocabulary is refused."""
    if len(mask) * 8 < vocab:
        raise ValueError(f"a token mask of {len(mask)} bytes cannot cover a vocabulary of {vocab}")
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")[:vocab]
    return torch.from_numpy(bits.astype(bool))


def step_generator(seed: int | None, step: int) -> torch.Generator | None:
    """A generator for one decoding step: a pure function of (seed, step)."""
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * _MIX + step) % (1 << 63))


def sample(logits: torch.Tensor, params: SamplingParams, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B], logprobs [B]); the logprob is under the unmodified model."""
    return sample_many([logits], [params], [step])[0]


def _filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Mask out tokens outside top-k and outside the top-p nucleus (always keeps the best one)."""
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(
            probs < params.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf")
        )
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # mass before >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_many(
    logits: list[torch.Tensor],
    params: list[SamplingParams],
    steps: list[int],
    controls: list[list[RowControls | None] | None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sample the next tokens of many sessions at once: logits [B_i, V] each -> (tokens [B_i],
    logprobs [B_i]) each. One log-softmax and one argmax for all rows; sampled sessions draw
    from their own (seed, step) generator, so a session's tokens do not depend on its batch.
    controls[i] (one per row of logits[i]) and the parameters' logit bias and penalties steer
    the choice; the logprobs stay those of the unmodified model."""
    sizes = [x.shape[0] for x in logits]
    flat = torch.cat(logits).float()  # [sum B_i, V]
    logprobs = torch.log_softmax(flat, dim=-1).split(sizes)
    best = flat.argmax(dim=-1).split(sizes)
    controls = controls or [None] * len(logits)
    out = []
    for x, p, step, lp, top, rows in zip(logits, params, steps, logprobs, best, controls, strict=True):
        if p.modifies_logits or any(r is not None and not r.empty for r in rows or ()):
            x = controlled(x, p, rows)
            top = x.argmax(dim=-1)
        if p.greedy:
            tokens = top
        else:
            probs = torch.softmax(_filtered(x.float() / p.temperature, p), dim=-1)
            tokens = torch.multinomial(probs.cpu(), 1, generator=step_generator(p.seed, step))[:, 0]
            tokens = tokens.to(x.device)
        out.append((tokens, lp.gather(-1, tokens[:, None])[:, 0]))
    return out


def top_entries(
    x: torch.Tensor, k: int = COMMIT_K, logits: bool = False
) -> tuple[list[list[int]], list[list[float]]]:
    """The k largest-magnitude entries of each row of x [B, D] (of logits: the k largest, so that
    a greedy token can be checked against them): (indices, values)."""
    x = x.detach().float().cpu()
    idx = torch.topk(x if logits else x.abs(), min(k, x.shape[-1]), dim=-1).indices
    return idx.tolist(), torch.gather(x, -1, idx).tolist()
