"""Pipelined micro-batches (SchedulerSettings.micro_batches): two stages, each a scheduler of its
own layers, sessions decoding through both. With micro-batches a stage's forward takes at most
half the sessions' decode steps, and waits for that many while they are due back, so that the
sessions move as two groups, one on each stage; greedy tokens are those of the unpipelined path."""

import asyncio

import torch

from inference import load_block
from inference.sampling import Sampling
from inference.scheduler import Job, Scheduler, SchedulerSettings

GREEDY = Sampling(temperature=0)
PROMPTS = [
    [5, 17, 99, 42],
    [9, 9, 1, 200, 31],
    [44] * 3,
    list(range(3, 12)),
    [7, 7],
    [1, 2, 3],
    [250],
    [8, 80],
]
TOKENS = 12


def decode(path, micro: bool, colocated: bool = False):
    """Each session's steps through stage 0:2, then 2:4 (sampled); returns every session's
    tokens and each stage's decode forwards' sizes after the first few."""
    first, second = load_block(path, "0:2"), load_block(path, "2:4")
    settings = SchedulerSettings(micro_batches=micro, batch_wait_s=0)
    sizes: dict[int, list[int]] = {0: [], 1: []}

    async def session(i, stages):
        ids, position, tokens = PROMPTS[i], 0, []
        for _ in range(TOKENS):
            x = torch.tensor([ids])
            hidden = await stages[0].run(Job(f"s{i}", x, position, (0, 2), stages=2))
            out = await stages[1].run(Job(f"s{i}", hidden, position, (2, 4), GREEDY, stages=2))
            position += len(ids)
            ids = out.tokens
            tokens.append(ids[0])
        return tokens

    async def main():
        stages = [Scheduler(lambda: first, settings), Scheduler(lambda: second, settings)]
        for k, sched in enumerate(stages):
            sched.colocated = colocated
            form = sched._form_batch

            def watched(form=form, k=k):
                batch = form()
                if batch and all(job.is_decode for job, _ in batch):
                    sizes[k].append(len(batch))
                return batch

            sched._form_batch = watched
        try:
            return await asyncio.gather(*(session(i, stages) for i in range(len(PROMPTS))))
        finally:
            for sched in stages:
                await sched.close()

    return asyncio.run(main()), {k: sorted(v[4:]) for k, v in sizes.items()}


def test_micro_batches_split_the_sessions_over_the_stages_and_keep_the_tokens(tiny_llama):
    plain, plain_sizes = decode(tiny_llama, micro=False)
    piped, piped_sizes = decode(tiny_llama, micro=True)
    assert piped == plain
    assert set(plain_sizes[0]) == {len(PROMPTS)}  # unpipelined: every session in one forward
    for sizes in piped_sizes.values():  # two groups, each gathered whole (the median) and never more
        assert sizes[-1] <= len(PROMPTS) // 2 and sizes[len(sizes) // 2] == len(PROMPTS) // 2


def test_no_micro_batches_where_the_stages_share_cores(tiny_llama):
    _, sizes = decode(tiny_llama, micro=True, colocated=True)  # (forwards take turns there)
    assert set(sizes[0]) == {len(PROMPTS)}
