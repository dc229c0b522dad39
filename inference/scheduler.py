"""The one owner of a peer's compute. Steps wait in a queue; whatever waits when the previous
forward ends runs as the next one (continuous batching): decode steps of many sessions together
with prefill chunks, so a long prompt cannot stall the others. Queue wait and compute time are
measured apart; a step that waits too long, or finds the queue full, is `Busy`, not failed."""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Protocol

import torch

from inference.batch import Step
from inference.block import Block
from inference.core_turns import CoreTurns
from inference.errors import CacheFullError
from inference.jobs import Busy, Job, NonFinite, Sampled, SchedulerSettings, SchedulerStats
from inference.step_sampling import sample_steps, score_positions

log = logging.getLogger("layerswarm.scheduler")

RECENT_S = 2.0  # a session that took a decode step here this recently is expected back
COLOCATED_WAIT_S = 0.05  # how long to wait for a session whose round time is not known yet
MERGE_FRACTION = 0.5  # co-located: wait up to this share of the queued sessions' round time
MAX_MERGE_WAIT_S = 1.0  # the longest a forward waits for sessions expected back
STRANGER_QUEUE_SHARE = 0.25  # of --max-step-queue, the most one sender not vouched for may queue
RECOUNT_S = 0.5  # a stranger's KV held is counted again after this long without a forward


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class SchedulerMetrics(Protocol):
    """The distributions a scheduler observes (peers/metrics.py's Metrics has them)."""

    queue_wait: Observer
    forward_seconds: Observer
    batch_steps: Observer
    batch_positions: Observer


class Scheduler:
    def __init__(
        self,
        block: Callable[[], Block | None],
        settings: SchedulerSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: SchedulerMetrics | None = None,
    ):
        """`block`: the block to compute with now (None while loading); `metrics`, if given,
        observes queue waits, forwards and batch sizes (peers/metrics.py's Metrics)."""
        self._block, self.settings, self._clock = block, settings or SchedulerSettings(), clock
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._task: asyncio.Task | None = None
        # session id -> (when its last decode step started here, the time since the one before)
        self._recent: dict[str, tuple[float, float | None]] = {}
        self.colocated = False  # other peers share this machine's cores (set by ThreadPolicy)
        self.turns: CoreTurns | None = None  # set by ThreadPolicy: forwards take turns with co-located peers
        self.stats = SchedulerStats()
        self._strangers: dict[str, int] = {}  # steps queued per sender not vouched for
        self._full: dict[str, tuple[bool, float]] = {}  # such senders at their KV share: (full, when counted)

    def __len__(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop())
            self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task) -> None:
        """The loop ended: a cancel on close, or a bug. Nothing queued may wait for ever."""
        if not task.cancelled() and task.exception() is not None:
            log.error("the scheduler stopped", exc_info=task.exception())
        for job in self._queue:
            if job.future is not None and not job.future.done():
                job.future.set_exception(Busy("this peer's scheduler stopped"))
        self._queue.clear()
        self._strangers.clear()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(Busy("this peer is shutting down"))
        self._queue.clear()
        self._strangers.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def run_in_compute(self, fn, *args):
        """Run `fn` on the compute thread (e.g. loading a block), between forwards."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, job: Job) -> torch.Tensor | Sampled:
        """Queue a step and wait for its output: hidden states [B, T, H], or the sampled tokens."""
        self.start()
        if len(self._queue) >= self.settings.max_queue:
            self.stats.busy += 1
            raise Busy(f"its step queue is full ({len(self._queue)} steps; --max-step-queue)")
        if not job.sender.vouched:
            self._admit_stranger(job)
        job.future = asyncio.get_running_loop().create_future()
        job.enqueued = self._clock()
        if job.block is not None:
            job.block.sessions.touch(job.session_id)  # queued is in use: not to be evicted
        self._queue.append(job)
        if not job.sender.vouched:
            self._strangers[job.sender.key] = self._strangers.get(job.sender.key, 0) + 1
        self._wake.set()
        return await job.future

    def _admit_stranger(self, job: Job) -> None:
        """A sender not vouched for queues at most STRANGER_QUEUE_SHARE of the queue (Busy), and
        opens no session while it holds its whole KV share (CacheFullError, before any work)."""
        key, most = job.sender.key, max(1, int(self.settings.max_queue * STRANGER_QUEUE_SHARE))
        if self._strangers.get(key, 0) >= most:
            self.stats.busy += 1
            raise Busy(f"its sender {key} is not vouched for and has {most} steps queued, the most it may")
        if job.position == 0 and job.block is not None:
            store = job.block.sessions
            full, at = self._full.get(key, (False, -RECOUNT_S))
            if self._clock() - at >= RECOUNT_S:  # (counted once a forward or RECOUNT_S, not once a frame)
                full = store.held_by(job.sender) >= store.stranger_tokens
                self._full[key] = (full, self._clock())
            if full:
                raise CacheFullError(
                    f"its sender {key} is not vouched for and holds {store.stranger_tokens} KV token "
                    f"slots here, the most one such sender may (of a budget of {store.max_tokens})"
                )

    def _dequeue(self, job: Job) -> None:
        self._queue.remove(job)
        if not job.sender.vouched:
            left = self._strangers.pop(job.sender.key, 1) - 1
            if left > 0:
                self._strangers[job.sender.key] = left

    def forget(self, session_id: str) -> None:
        """A session ended: no forward waits for it any more."""
        self._recent.pop(session_id, None)

    async def _gather(self) -> None:
        """Wait while sessions that stepped here within RECENT_S are neither queued nor gone: up
        to batch_wait_s from the oldest queued step, or (batch_wait_s None) for those due back
        soon: co-located, all of them (see SchedulerSettings.batch_wait_s); else until the next
        micro-batch is whole (SchedulerSettings.micro_batches)."""
        fixed = self.settings.batch_wait_s
        micro = fixed is None and not self.colocated  # (then it waits only to fill a micro-batch)
        while self._queue and fixed != 0:
            now = self._clock()
            self._drop_stale(now)
            queued = {j.session_id for j in self._queue}
            missing = [self._recent[sid] for sid in self._recent.keys() - queued]
            if micro:
                decodes = [j for j in self._queue if j.is_decode]
                target = self._micro_batch(decodes)
                if target is None or len(decodes) >= target:
                    return
            if not missing:
                return
            oldest = min(j.enqueued for j in self._queue)
            until = oldest + fixed if fixed is not None else self._merge_until(oldest, queued, missing)
            if until <= now:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), until - now)
            except TimeoutError:
                return

    def _merge_until(
        self, oldest: float, queued: set[str], missing: list[tuple[float, float | None]]
    ) -> float:
        """Co-located: until when a forward waits for the missing sessions (see batch_wait_s)."""
        unknown = oldest + COLOCATED_WAIT_S  # for sessions whose round time is not known yet
        rounds = sorted(r for sid in queued if (r := self._recent.get(sid, (0.0, None))[1]) is not None)
        if not rounds:
            return unknown
        end = oldest + min(max(COLOCATED_WAIT_S, MERGE_FRACTION * rounds[len(rounds) // 2]), MAX_MERGE_WAIT_S)
        until = end if any(rtt is not None and last + rtt <= end for last, rtt in missing) else oldest
        return max(until, unknown) if any(rtt is None for _, rtt in missing) else until

    def _drop_stale(self, now: float) -> None:
        for sid in [sid for sid, (t, _) in self._recent.items() if now - t > RECENT_S]:
            del self._recent[sid]  # sessions whose close never came

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await self._gather()
            batch = self._form_batch()
            self._full.clear()
            if not batch:
                continue
            block, turns = self._block(), self.turns
            t0, waited, skipped = self._clock(), turns.wait_s if turns else 0.0, turns.skipped if turns else 0
            try:
                results = await loop.run_in_executor(self._executor, _compute_in_turn, turns, block, batch)
            except Exception as e:  # the block is gone (moving) or the thread pool shut down
                results = [e] * len(batch)
            waited = turns.wait_s - waited if turns else 0.0
            self.stats.turns_skipped += turns.skipped - skipped if turns else 0
            elapsed = self._clock() - t0 - waited
            self.stats.batches += 1
            self.stats.compute_s += elapsed
            self.stats.turn_wait_s += waited
            self.stats.max_batch_steps = max(self.stats.max_batch_steps, len(batch))
            if self.metrics is not None:
                self.metrics.forward_seconds.observe(elapsed)
                self.metrics.batch_steps.observe(len(batch))
                self.metrics.batch_positions.observe(sum(size * job.batch for job, size in batch))
            if all(job.draft or size == 1 for job, size in batch):  # (whole decode steps only)
                self.stats.decode_batches += 1
                self.stats.decode_compute_s += elapsed
            for (job, size), result in zip(batch, results, strict=True):
                job.compute_s += elapsed
                self.stats.positions += size * job.batch
                if isinstance(result, BaseException):
                    self._finish(job, error=result)
                    continue
                job.done += size
                if result is not None:
                    job.outputs.append(result)
                if job.remaining == 0:
                    self.stats.steps += 1
                    out = job.outputs[-1] if job.sampling is not None else _joined(job.outputs)
                    self._finish(job, result=out)

    def _form_batch(self) -> list[tuple[Job, int]]:
        """Decode steps first, then prefill chunks in arrival order, within max_batch_tokens."""
        now, s = self._clock(), self.settings
        self._drop_stale(now)
        for job in list(self._queue):
            if job.future.done():  # its caller gave up
                self._dequeue(job)
            elif job.started is None and now - job.enqueued > s.max_queue_wait_s:
                self.stats.busy += 1
                self._finish(
                    job,
                    error=Busy(
                        f"the step waited {now - job.enqueued:.1f} s in a queue of {len(self._queue)} "
                        f"steps (--max-queue-wait {s.max_queue_wait_s:g} s)"
                    ),
                )
        budget, batch = s.max_batch_tokens, []
        decodes = [j for j in self._queue if j.is_decode]
        decodes = decodes[: self._micro_batch(decodes) or len(decodes)]
        prefills = [j for j in self._queue if not j.is_decode]
        # while prompts wait, decode steps leave room for one chunk, so that no prompt starves
        reserved = min(s.prefill_chunk, s.max_batch_tokens // 2) if prefills else 0
        for job in decodes + prefills:
            room = budget - (reserved if job.is_decode else 0)
            size = min(job.remaining, s.prefill_chunk, room // job.batch)
            if job.draft and size < job.remaining:
                size = 0  # a drafted step is never cut: its last draft + 1 positions are sampled at once
            if size < 1:
                if batch:
                    continue
                # one step larger than the budget runs alone
                size = job.remaining if job.draft else min(job.remaining, s.prefill_chunk)
            batch.append((job, size))
            budget -= size * job.batch
            if job.is_decode:
                last = self._recent.get(job.session_id)
                self._recent[job.session_id] = (now, now - last[0] if last else None)
            if job.started is None:
                job.started = now
                self.stats.queue_wait_s += now - job.enqueued
                if self.metrics is not None:
                    self.metrics.queue_wait.observe(now - job.enqueued)
        return batch

    def _micro_batch(self, decodes: list[Job]) -> int | None:
        """How many of the queued decode steps (oldest first) a micro-batch holds: the sessions
        stepping here (seen within RECENT_S, or queued) over the pipeline's stages, rounded up;
        None where micro-batches do not apply (SchedulerSettings.micro_batches)."""
        stages = max((job.stages for job in decodes), default=1)
        if stages < 2 or self.colocated or not self.settings.micro_batches:
            return None
        return -(-len(self._recent.keys() | {job.session_id for job in decodes}) // stages)

    def _finish(self, job: Job, result=None, error: BaseException | None = None) -> None:
        if job in self._queue:
            self._dequeue(job)
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)


def _joined(outputs: list[torch.Tensor]) -> torch.Tensor:
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def _compute_in_turn(turns: CoreTurns | None, block: Block | None, batch: list[tuple[Job, int]]) -> list:
    if turns is None:
        return _compute(block, batch)
    with turns:
        return _compute(block, batch)


def _compute(block: Block | None, batch: list[tuple[Job, int]]) -> list:
    """On the compute thread: one forward of the block over the batch's chunks; sampling for
    the steps that end the model. Per chunk: hidden states (on the CPU, ready to travel), None
    (a non-final chunk at the last layer), a Sampled, or the exception that refused it. One
    step's failure never fails the others."""
    if block is None:
        raise Busy("this peer is loading its layers")
    refused = _restore_prefixes(block, batch)
    runnable = [i for i in range(len(batch)) if i not in refused]
    steps = [
        Step(
            job.session_id,
            job.inputs[:, job.done : job.done + size],
            job.position + job.done,
            job.layers,
            last_only=not job.draft and job.score is None,
            drafted=bool(job.draft),
            sender=job.sender,
        )
        for job, size in (batch[i] for i in runnable)
    ]
    outs = dict(zip(runnable, block.forward_batch(steps), strict=True)) | refused
    results: list = []
    to_sample = []
    for i, (job, size) in enumerate(batch):
        result = _chunk_result(block, job, size, outs[i])
        results.append(result)
        if job.sampling is not None and isinstance(result, torch.Tensor):
            to_sample.append(i)  # the logits after a step's last position
    if to_sample:
        for i, result in zip(to_sample, sample_steps(batch, results, to_sample), strict=True):
            scored = batch[i][0].score is not None and isinstance(result, Sampled)
            results[i] = replace(result, prompt=tuple(batch[i][0].scores)) if scored else result
    return results


def _restore_prefixes(block: Block, batch: list[tuple[Job, int]]) -> dict[int, Exception]:
    """Refuse the chunks of steps checked against another block; restore the cached prefix of
    each step starting here (its chunk shrinks to what is left). The refusals, by index."""
    refused: dict[int, Exception] = {}
    for i, (job, size) in enumerate(batch):
        if job.block is not None and job.block is not block:
            refused[i] = Busy("this peer moved to other layers while the step waited")
            continue
        if job.done == 0 and job.prefix and job.batch == 1:
            try:
                job.skipped = block.restore_prefix(
                    job.session_id, job.layers, job.prefix, job.position, job.inputs.shape[1], job.sender
                )
            except Exception as e:
                refused[i] = e
            job.done = job.skipped
            batch[i] = (job, min(size, job.remaining))
    return refused


def _chunk_result(block: Block, job: Job, size: int, out):
    """What one chunk's forward output becomes: hidden states on the CPU, logits to sample,
    None (a prompt's inner chunk at the last layer), or the exception that refused it."""
    if isinstance(out, Exception):
        return out
    if job.sampling is None:
        out = out.cpu()  # hidden states travel from the host: the one wait for the device
    if not torch.isfinite(out).all():
        a, b = job.layers
        return NonFinite(f"non-finite values in the output of layers {a}:{b}")
    if job.prefix and job.remaining == size:
        try:
            block.store_prefix(job.session_id, job.prefix)
        except Exception as e:  # keeping a prefix is an optimisation: never fail the step for it
            log.warning("keeping the prefix of %s failed: %s", job.session_id, e)
    if job.score is not None and job.sampling is not None:
        try:
            _score_chunk(job, size, out)
        except ValueError as e:
            return e
    if job.sampling is not None and job.remaining > size:
        return None  # logits of a prompt's inner chunk: not needed (but for their scores)
    return out


def _score_chunk(job: Job, size: int, logits: torch.Tensor) -> None:
    """Score the positions of the chunk that starts at job.done (logits [B, size, V]; the first
    sequence's, as every sequence of a prompt step holds the same prompt)."""
    first, end = job.done, min(job.done + size, len(job.score.targets))
    if end > first:
        job.scores += score_positions(logits[0, : end - first], job.score.targets[first:end], job.score.top)
