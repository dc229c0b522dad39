"""The step scheduler in one process: batches form from whatever waits, a long prompt runs in
chunks between other sessions' decode steps, a full or slow queue answers busy, and prefix reuse
restores KV without changing the output."""

import asyncio
import threading
import time

import pytest
import torch

from inference import load_block
from inference.sampling import Sampling
from inference.scheduler import Busy, Job, Sampled, Scheduler, SchedulerSettings
from peers.entry.prefix import prefix_hashes

GREEDY = Sampling(temperature=0)
PROMPTS = [[5, 17, 99, 42, 7, 3, 250, 64, 12, 8, 77], [9, 9, 1, 200, 31], [44] * 3, list(range(3, 40))]


def job(sid, ids, position=0, layers=(0, 4), sampling=GREEDY, prefix=()):
    return Job(sid, torch.tensor(ids), position, layers, sampling, prefix)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_steps_run_as_one_batch_and_equal_each_alone(tiny_llama):
    block, alone = load_block(tiny_llama), load_block(tiny_llama)

    async def main():
        sched = Scheduler(lambda: block)
        try:
            return await asyncio.gather(
                *(sched.run(job(f"s{i}", [p])) for i, p in enumerate(PROMPTS))
            ), sched.stats
        finally:
            await sched.close()

    results, stats = run(main())
    assert stats.batches == 1 and stats.max_batch_steps == len(PROMPTS)
    for i, (p, result) in enumerate(zip(PROMPTS, results, strict=True)):
        assert isinstance(result, Sampled)
        assert result.tokens == [int(alone.forward(f"a{i}", torch.tensor([p]), 0)[0, -1].argmax())]


def test_a_long_prompt_runs_in_chunks_between_decode_steps(tiny_llama):
    block = load_block(tiny_llama)
    order = []

    async def main():
        sched = Scheduler(lambda: block, SchedulerSettings(prefill_chunk=8, max_batch_tokens=9))
        try:
            first = await sched.run(job("short", [PROMPTS[1]]))
            long_prompt = list(range(3, 203))  # 200 positions: 25 chunks

            async def decode_steps():
                token, position = first.tokens[0], len(PROMPTS[1])
                for _ in range(5):
                    out = await sched.run(job("short", [[token]], position))
                    token, position = out.tokens[0], position + 1
                order.append("decodes done")

            async def prefill():
                await sched.run(job("long", [long_prompt]))
                order.append("prefill done")

            await asyncio.gather(prefill(), decode_steps())
            return sched.stats
        finally:
            await sched.close()

    stats = run(main())
    assert order == ["decodes done", "prefill done"]  # the prompt did not stall the short session
    assert stats.max_batch_steps == 2  # a chunk and a decode step shared forwards


def test_chunked_prefill_output_equals_one_forward(tiny_llama):
    block, alone = load_block(tiny_llama), load_block(tiny_llama)
    prompt = list(range(3, 103))

    async def main():
        sched = Scheduler(lambda: block, SchedulerSettings(prefill_chunk=16))
        try:
            return await sched.run(job("p", [prompt], layers=(0, 2), sampling=None))
        finally:
            await sched.close()

    hidden = run(main())
    expected = alone.forward("p", torch.tensor([prompt]), 0, layers=(0, 2))
    assert hidden.shape == expected.shape and torch.allclose(hidden, expected, atol=1e-5)


class SlowBlock:
    """Stands in for a block whose forwards take a while."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, threading.Event()

    def forward_batch(self, steps):
        self.started.set()
        time.sleep(self.seconds)
        return [torch.zeros(*s.inputs.shape[:2], 8) for s in steps]


def test_a_full_queue_answers_busy_at_once():
    async def main():
        sched = Scheduler(lambda: SlowBlock(0.3), SchedulerSettings(max_queue=2))
        try:
            running = [asyncio.ensure_future(sched.run(job(f"s{i}", [[1]], sampling=None))) for i in range(2)]
            await asyncio.sleep(0.05)
            with pytest.raises(Busy, match="queue is full"):
                await sched.run(job("third", [[1]], sampling=None))
            still_running = not any(r.done() for r in running)  # refused without waiting for them
            await asyncio.gather(*running)
            return still_running, sched.stats.busy
        finally:
            await sched.close()

    still_running, busy = run(main())
    assert busy == 1 and still_running


def test_a_step_waiting_too_long_is_busy_not_failed():
    block = SlowBlock(0.5)

    async def main():
        sched = Scheduler(lambda: block, SchedulerSettings(max_queue_wait_s=0.1, max_batch_tokens=1))
        try:
            first = asyncio.ensure_future(sched.run(job("a", [[1]], sampling=None)))
            await asyncio.to_thread(block.started.wait)
            with pytest.raises(Busy, match="waited"):
                await sched.run(job("b", [[1]], sampling=None))  # queued behind a 0.5 s forward
            await first
        finally:
            await sched.close()

    run(main())


def test_prefix_reuse_restores_kv_and_keeps_the_output(tiny_llama):
    system = list(range(3, 80))  # 77 tokens: two full blocks of 32
    block, alone = load_block(tiny_llama, prefix_cache_tokens=1024), load_block(tiny_llama)

    async def main():
        sched = Scheduler(lambda: block)
        try:
            outs = []
            for i, question in enumerate(([7, 8, 9], [10, 11])):
                ids = system + question
                j = job(f"q{i}", [ids], layers=(0, 2), sampling=None, prefix=prefix_hashes(ids))
                outs.append((await sched.run(j), j.skipped))
            return outs
        finally:
            await sched.close()

    (first, skipped_first), (second, skipped_second) = run(main())
    assert skipped_first == 0 and skipped_second == 64
    ids = system + [10, 11]
    expected = alone.forward("ref", torch.tensor([ids]), 0, layers=(0, 2))
    assert second.shape[1] == len(ids) - 64  # only the positions after the reused blocks travel on
    assert torch.allclose(second, expected[:, 64:], atol=1e-5)
    assert block.prefixes.hits == 64


def test_a_forward_waits_for_sessions_mid_round_but_never_when_alone(tiny_llama):
    block = load_block(tiny_llama)

    async def main():
        sched = Scheduler(lambda: block, SchedulerSettings(batch_wait_s=10.0))
        try:
            # alone: five decode steps in a row never wait for anybody (10 s would time out)
            out = await sched.run(job("solo", [PROMPTS[0]]))
            token, position = out.tokens[0], len(PROMPTS[0])
            for _ in range(5):
                out = await asyncio.wait_for(sched.run(job("solo", [[token]], position)), 5)
                token, position = out.tokens[0], position + 1
            sched.forget("solo")
            # two sessions in rounds: when one comes back first, the forward waits for the other
            outs = await asyncio.gather(*(sched.run(job(s, [PROMPTS[1]])) for s in "ab"))
            position = len(PROMPTS[1])
            outs = await asyncio.gather(
                *(sched.run(job(s, [[o.tokens[0]]], position)) for s, o in zip("ab", outs, strict=True))
            )
            steps = [job(s, [[o.tokens[0]]], position + 1) for s, o in zip("ab", outs, strict=True)]
            before = sched.stats.batches

            async def late():
                await asyncio.sleep(0.3)  # b is still on its way through other peers
                return await sched.run(steps[1])

            await asyncio.wait_for(asyncio.gather(sched.run(steps[0]), late()), 5)
            return sched.stats.batches - before, sched.stats.max_batch_steps
        finally:
            await sched.close()

    batches, largest = run(main())
    assert batches == 1 and largest == 2


async def _rounds(sched: Scheduler, sid: str, rounds: int, travel_s: float, late_s: float = 0.0):
    """One session's decode rounds; between its steps here it travels through other peers.
    Returns its tokens and the seconds its rounds took."""
    await asyncio.sleep(late_s)
    out = await sched.run(job(sid, [PROMPTS[1]]))
    tokens, position, t0 = out.tokens, len(PROMPTS[1]), time.monotonic()
    for _ in range(rounds):
        await asyncio.sleep(travel_s)
        out = await sched.run(job(sid, [tokens[-1:]], position))
        tokens, position = tokens + out.tokens, position + 1
    return tokens, time.monotonic() - t0


def test_colocated_waves_that_drifted_apart_merge(tiny_llama):
    """Co-located (forwards take turns on the same cores): two sessions whose rounds are out of
    step by more than twice COLOCATED_WAIT_S end up in one forward per round."""
    block = load_block(tiny_llama)
    rounds = 6

    async def main():
        sched = Scheduler(lambda: block)
        sched.colocated = True
        try:
            got = await asyncio.wait_for(
                asyncio.gather(
                    _rounds(sched, "a", rounds, 0.4), _rounds(sched, "b", rounds, 0.4, late_s=0.12)
                ),
                30,
            )
            return got, sched.stats
        finally:
            await sched.close()

    ((a, _), (b, _)), stats = run(main())
    assert a == b  # the same prompt, greedy: the same tokens, whatever the batch
    assert stats.max_batch_steps == 2  # merged ...
    assert stats.batches <= 2 + 2 * rounds - 2  # ... for good: at least two rounds in one forward


def test_colocated_a_slow_session_does_not_hold_the_others(tiny_llama):
    """A session that comes back seldom (a slow client, a far entry) is not waited for by the
    sessions that come back often: they keep their own pace."""
    block = load_block(tiny_llama)

    async def main():
        sched = Scheduler(lambda: block)
        sched.colocated = True
        try:
            fast, _ = await asyncio.wait_for(
                asyncio.gather(_rounds(sched, "fast", 30, 0.05), _rounds(sched, "slow", 5, 0.7)), 60
            )
            return fast[1]
        finally:
            await sched.close()

    # 30 rounds of 50 ms travel: ~1.7 s; waiting for the slow one whenever it is missing (until
    # due back, up to MAX_MERGE_WAIT_S) would take several seconds more
    assert run(main()) < 3.0


def test_one_steps_sampling_failure_stays_its_own(tiny_llama, monkeypatch):
    import inference.step_sampling as step_sampling

    real = step_sampling.sample_many

    def fragile(logits, params, steps, controls=None):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("this session's sampling broke")
        return real(logits, params, steps, controls)

    monkeypatch.setattr(step_sampling, "sample_many", fragile)
    block = load_block(tiny_llama)

    async def main():
        sched = Scheduler(lambda: block)
        try:
            good = job("good", [PROMPTS[0]])
            bad = job("bad", [PROMPTS[1]], sampling=Sampling(temperature=1.0, seed=666))
            return await asyncio.gather(sched.run(good), sched.run(bad), return_exceptions=True), sched.stats
        finally:
            await sched.close()

    (good, bad), stats = run(main())
    assert stats.batches == 1  # they shared a forward
    assert isinstance(good, Sampled) and isinstance(bad, RuntimeError)


def test_decode_steps_leave_room_for_a_waiting_prompt(tiny_llama):
    """Decode steps enough to fill a forward still leave a chunk's room for a waiting prompt."""
    block = load_block(tiny_llama)
    forwards = []

    class Recording:
        def forward_batch(self, steps):
            forwards.append(sorted(s.inputs.shape[1] for s in steps))
            return block.forward_batch(steps)

    async def main():
        sched = Scheduler(lambda: Recording(), SchedulerSettings(max_batch_tokens=8, prefill_chunk=4))
        try:
            opened = await asyncio.gather(*(sched.run(job(f"d{i}", [[5, 6]])) for i in range(8)))
            forwards.clear()
            steps = [sched.run(job(f"d{i}", [[o.tokens[0]]], 2)) for i, o in enumerate(opened)]
            await asyncio.gather(*steps, sched.run(job("p", [list(range(3, 40))])))
        finally:
            await sched.close()

    run(main())
    assert forwards[0] == [1, 1, 1, 1, 4]  # four decode steps and a chunk of the prompt


def test_the_metrics_sink_given_at_construction_observes_forwards(tiny_llama):
    """A scheduler built with a metrics sink observes each forward, its batch and queue waits."""
    block = load_block(tiny_llama)

    class Histogram:
        def __init__(self):
            self.values = []

        def observe(self, amount):
            self.values.append(amount)

    class Metrics:
        queue_wait, forward_seconds, batch_steps, batch_positions = (Histogram() for _ in range(4))

    async def main():
        sched = Scheduler(lambda: block, metrics=Metrics)
        try:
            return await asyncio.gather(*(sched.run(job(f"s{i}", [p])) for i, p in enumerate(PROMPTS[:2])))
        finally:
            await sched.close()

    assert all(isinstance(r, Sampled) for r in run(main()))
    assert Metrics.batch_steps.values == [2] and len(Metrics.forward_seconds.values) == 1
    assert Metrics.batch_positions.values == [len(PROMPTS[0]) + len(PROMPTS[1])]
    assert len(Metrics.queue_wait.values) == 2
