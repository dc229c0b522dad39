"""Sampling the steps of one forward that end the model: the tokens chosen after each step's last
position (or each drafted position), their logprobs and the alternatives asked for; and scoring a
prompt's positions (prompt logprobs)."""

from collections.abc import Sequence

import torch

from inference.grammar import unpack_mask
from inference.jobs import Job, Sampled
from inference.sampling import Controls, PositionScore, RowControls, Sampling, sample_many, top_entries


def sample_steps(batch: list[tuple[Job, int]], results: list, which: list[int]) -> list:
    """Sample the steps `which` together; if that fails, one by one, so that one step's failure
    stays its own (its exception in its place)."""
    try:
        return _sample(batch, results, which)
    except Exception:
        sampled: list = []
        for i in which:
            try:
                sampled.append(_sample(batch, results, [i])[0])
            except Exception as e:
                sampled.append(e)
        return sampled


def _sample(batch: list[tuple[Job, int]], results: list, which: list[int]) -> list[Sampled]:
    """The tokens chosen after each step's last position ([B, V] logits each), or, for a
    drafted step, after each of its last draft + 1 positions (one sequence: one row each, each
    drawn from its own position's generator, so that speculation samples what plain decoding
    would: see peers/entry/speculative.py)."""
    logits, params, positions, spans, controls = [], [], [], [], []
    for i in which:
        job = batch[i][0]
        s = job.sampling
        p = s.params()
        end = job.position + job.inputs.shape[1]  # the position of the token chosen after the last
        rows = job.draft + 1
        spans.append((len(logits), rows))
        vocab = results[i].shape[-1]
        steer = [_row_controls(c, s, vocab) for c in job.controls]
        for r in range(rows):
            logits.append(results[i][:, r - rows])  # [B, V]
            params.append(p)
            positions.append(end - rows + 1 + r)
            # a drafted step's controls go one per position, a plain step's one per sequence
            controls.append((steer[r : r + 1] if job.draft else steer) or None)
    sampled = sample_many(logits, params, positions, controls)
    out = []
    for i, (start, rows) in zip(which, spans, strict=True):
        chosen = sampled[start : start + rows]
        tokens = [t for toks, _ in chosen for t in toks.tolist()]
        logprobs = [x for _, lps in chosen for x in lps.tolist()]
        top = top_entries(logits[start + rows - 1], logits=True) if batch[i][0].commit else None
        k = batch[i][0].sampling.top_logprobs
        alternatives = _alternatives(logits[start : start + rows], k) if k else ()
        out.append(Sampled(tokens, logprobs, top=top, alternatives=alternatives))
    return out


def _row_controls(c: Controls, s: Sampling, vocab: int) -> RowControls:
    return RowControls(
        counts=c.counts,
        context=s.prompt_tokens,
        banned=c.banned,
        mask=None if c.mask is None else unpack_mask(c.mask, vocab),
    )


def _alternatives(logits: list[torch.Tensor], k: int) -> tuple:
    """The k likeliest tokens and their logprobs after each sampled row, in the order of the
    step's tokens (logits [B, V] per position)."""
    out = []
    for x in logits:
        lps, ids = torch.log_softmax(x.float(), dim=-1).topk(min(k, x.shape[-1]), dim=-1)  # [B, k]
        for row_ids, row_lps in zip(ids.tolist(), lps.tolist(), strict=True):
            out.append(tuple(zip(row_ids, row_lps, strict=True)))
    return tuple(out)


def score_positions(logits: torch.Tensor, targets: Sequence[int], top: int) -> list[PositionScore]:
    """logits [T, V] of one sequence's positions -> each position's score of its target (the
    token that follows it: T of them): its logprob under the unmodified model, its rank, and
    the `top` likeliest tokens. ValueError for a target outside the vocabulary."""
    lps = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    vocab = lps.shape[-1]
    ids = torch.tensor(list(targets), dtype=torch.long, device=lps.device)  # [T]
    assert ids.shape[0] == lps.shape[0], f"{ids.shape[0]} targets for {lps.shape[0]} positions"
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"a prompt token to score lies outside [0, {vocab})")
    chosen = lps.gather(1, ids[:, None])  # [T, 1]
    ranks = (lps > chosen).sum(dim=-1) + 1  # [T]
    tops: list[tuple] = [()] * len(ids)
    if top > 0:
        values, indices = lps.topk(min(top, vocab), dim=-1)  # [T, k]
        tops = [
            tuple(zip(row_ids, row_lps, strict=True))
            for row_ids, row_lps in zip(indices.tolist(), values.tolist(), strict=True)
        ]
    return [
        PositionScore(lp, rank, t)
        for lp, rank, t in zip(chosen[:, 0].tolist(), ranks.tolist(), tops, strict=True)
    ]
