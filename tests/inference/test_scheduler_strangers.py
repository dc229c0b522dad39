"""The scheduler's door for senders not vouched for: a bounded share of the step queue, and no
queued work for a session that its sender's KV share could not hold (inference/scheduler.py)."""

import asyncio
import threading
import time

import pytest
import torch

from inference import CacheFullError, load_block
from inference.kv_cache import FIRST_TOKENS, STRANGER_SHARE, Sender
from inference.sampling import Sampling
from inference.scheduler import RECOUNT_S, STRANGER_QUEUE_SHARE, Busy, Job, Scheduler, SchedulerSettings
from tests.helpers import FakeClock

STRANGER, PEER = Sender("host:127.0.0.2"), Sender("host:127.0.0.1", vouched=True)


class SlowBlock:
    """Stands in for a block whose forwards take a while."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, threading.Event()

    def forward_batch(self, steps):
        self.started.set()
        time.sleep(self.seconds)
        return [torch.zeros(*s.inputs.shape[:2], 8) for s in steps]


def one(sid: str, sender: Sender, block=None, sampling=None) -> Job:
    return Job(sid, torch.tensor([[1]]), 0, (0, 4), sampling, block=block, sender=sender)


def test_a_stranger_fills_at_most_its_share_of_the_queue():
    block = SlowBlock(0.3)
    settings = SchedulerSettings(max_queue=8, max_batch_tokens=1)
    most = int(settings.max_queue * STRANGER_QUEUE_SHARE)

    async def main():
        sched = Scheduler(lambda: block, settings)
        try:
            first = asyncio.ensure_future(sched.run(one("running", PEER)))
            await asyncio.to_thread(block.started.wait)  # the queue waits behind a slow forward
            queued = [asyncio.ensure_future(sched.run(one(f"x{i}", STRANGER))) for i in range(most)]
            await asyncio.sleep(0)
            with pytest.raises(Busy, match=rf"sender host:127.0.0.2 is not vouched for and has {most} steps"):
                await sched.run(one("x-late", STRANGER))
            theirs = asyncio.ensure_future(sched.run(one("peer", PEER)))  # a peer's step still queues
            await asyncio.gather(first, theirs, *queued)
            late = await sched.run(one("x-after", STRANGER))  # its steps ran: room again
            return sched.stats.busy, late.shape
        finally:
            await sched.close()

    busy, late = asyncio.run(main())
    assert busy == 1 and late == (1, 1, 8)


def test_a_stranger_at_its_kv_share_is_refused_before_any_work(tiny_llama):
    budget = 8 * FIRST_TOKENS
    block = load_block(tiny_llama, max_cache_tokens=budget)
    fits = int(budget * STRANGER_SHARE) // FIRST_TOKENS  # one-position sessions within its share

    async def main():
        sched = Scheduler(lambda: block)
        try:
            for i in range(fits):
                await sched.run(one(f"x{i}", STRANGER, block, Sampling(temperature=0)))
            batches = sched.stats.batches
            with pytest.raises(CacheFullError, match="sender host:127.0.0.2 is not vouched for and holds 32"):
                await sched.run(one("x-late", STRANGER, block, Sampling(temperature=0)))
            refused_at_once = sched.stats.batches == batches
            await sched.run(one("peer", PEER, block, Sampling(temperature=0)))  # a peer's session opens
            return refused_at_once
        finally:
            await sched.close()

    assert asyncio.run(main())
    assert block.sessions.held_by(STRANGER) == budget * STRANGER_SHARE and "peer" in block.sessions


def test_a_stranger_whose_sessions_are_gone_is_admitted_again_without_another_forward(tiny_llama):
    """The refusal at the door counts what the stranger holds once a forward, or again after
    RECOUNT_S when no forward ran (a refused step runs none): its closed sessions free its share."""
    budget, clock = 8 * FIRST_TOKENS, FakeClock()
    block = load_block(tiny_llama, max_cache_tokens=budget)
    fits = int(budget * STRANGER_SHARE) // FIRST_TOKENS

    async def main():
        sched = Scheduler(lambda: block, clock=clock)
        try:
            for i in range(fits):
                await sched.run(one(f"x{i}", STRANGER, block, Sampling(temperature=0)))
            with pytest.raises(CacheFullError, match="not vouched for"):
                await sched.run(one("x-late", STRANGER, block, Sampling(temperature=0)))
            for i in range(fits):
                block.close(f"x{i}")
            clock.now += RECOUNT_S
            return await sched.run(one("x-again", STRANGER, block, Sampling(temperature=0)))
        finally:
            await sched.close()

    assert asyncio.run(main()).tokens and "x-again" in block.sessions
