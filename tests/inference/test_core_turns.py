"""CPU turns: co-located peers' forwards take turns on the cores (a forward waits for its turn,
a killed or frozen holder blocks no one), and the thread policy that decides when they do."""

import asyncio
import contextlib
import subprocess
import sys
import threading
import time

import pytest
import torch

from inference import load_block
from inference.core_turns import CoreTurns, ThreadPolicy, colocated_peers
from inference.sampling import Sampling
from inference.scheduler import Job, Sampled, Scheduler

GREEDY = Sampling(temperature=0)
PROMPTS = [[5, 17, 99, 42, 7, 3, 250, 64, 12, 8, 77], [9, 9, 1, 200, 31], [44] * 3]


def job(sid, ids):
    return Job(sid, torch.tensor(ids), 0, (0, 4), GREEDY)


def run(coro):
    return asyncio.run(coro)


def test_forwards_wait_for_their_turn_on_the_cores(tiny_llama, tmp_path):
    """With core turns, a forward starts only once the co-located peer's forward has ended, and
    the wait counts as waiting, not as compute."""
    block = load_block(tiny_llama)
    path = str(tmp_path / "cores.lock")
    other = CoreTurns(path)  # another peer's forward, holding the cores
    other.__enter__()
    released = threading.Event()

    def release():
        time.sleep(0.5)
        released.set()
        other.__exit__(None, None, None)

    async def main():
        sched = Scheduler(lambda: block)
        sched.turns = CoreTurns(path)
        threading.Thread(target=release).start()
        try:
            result = await sched.run(job("s", [PROMPTS[0]]))
            return result, released.is_set(), sched.stats, sched.turns
        finally:
            await sched.close()
            sched.turns.close()
            other.close()

    result, after_release, stats, turns = run(main())
    assert isinstance(result, Sampled) and after_release
    assert turns.turns == 1 and stats.turn_wait_s >= 0.4 and stats.turn_wait_s == pytest.approx(turns.wait_s)
    assert stats.compute_s < stats.turn_wait_s  # the wait is not counted as compute


def test_a_killed_peer_leaves_no_turn_held(tmp_path):
    """The kernel releases a dead holder's lock: a peer killed mid-forward blocks no one."""
    path = str(tmp_path / "cores.lock")
    with turn_held_elsewhere(path) as holder:
        holder.kill()
        holder.wait(10)
        turns = CoreTurns(path)
        done = threading.Event()
        threading.Thread(target=lambda: (turns.__enter__(), done.set())).start()
        assert done.wait(10), "the turn of a killed peer was never released"
        turns.__exit__(None, None, None)
        turns.close()


def test_a_frozen_holder_of_the_turn_does_not_stop_the_others(tiny_llama, tmp_path):
    """A co-located peer frozen while it holds the cores (its lock stays held): forwards wait
    for it at most max_wait_s once, then run without turns until it lets go."""
    block = load_block(tiny_llama)
    path = str(tmp_path / "cores.lock")
    with turn_held_elsewhere(path) as holder:

        async def main():
            sched = Scheduler(lambda: block)
            sched.turns = CoreTurns(path, max_wait_s=0.3)
            try:
                first = await sched.run(job("a", [PROMPTS[0]]))
                waited = sched.stats.turn_wait_s
                second = await sched.run(job("b", [PROMPTS[1]]))  # no second wait
                holder.kill()  # the holder lets go (here: dies)
                holder.wait(10)
                for _ in range(100):  # until the background ask got the lock and gave it back
                    if sched.turns._stuck is None:
                        break
                    await asyncio.sleep(0.05)
                third = await sched.run(job("c", [PROMPTS[2]]))
                return first, second, third, waited, sched.stats, sched.turns
            finally:
                await sched.close()
                sched.turns.close()

        first, second, third, waited, stats, turns = run(main())
    assert all(isinstance(r, Sampled) for r in (first, second, third))
    assert 0.3 <= waited < 1.0 and stats.turn_wait_s < waited + 0.2
    assert stats.turns_skipped == 2 and turns.turns == 1  # the third ran in a turn again


@contextlib.contextmanager
def turn_held_elsewhere(path: str):
    """Another process that takes the turn and keeps it (as a frozen peer would); killed after."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_TURN, path], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            yield holder
        finally:
            holder.kill()


HOLD_TURN = """
import sys, time
from inference.core_turns import CoreTurns
turns = CoreTurns(sys.argv[1])
turns.__enter__()
print("held", flush=True)
time.sleep(600)
"""


class FakeScheduler:
    colocated = False
    turns = None

    def __init__(self):
        self.computed = []

    async def run_in_compute(self, fn, *args):
        self.computed.append((fn, args))


@pytest.mark.parametrize(
    ("mode", "device", "colocated", "threads", "cores", "on"),
    [
        ("auto", None, 3, 2, 2, True),  # three peers of 2 threads on 2 cores
        ("auto", None, 1, 2, 2, False),  # alone on the machine
        ("auto", None, 3, 4, 16, False),  # 12 threads fit 16 cores
        ("auto", "cuda", 3, 2, 2, False),  # a GPU peer's forwards do not run on the cores
        ("on", None, 1, 2, 16, True),
        ("off", None, 3, 2, 2, False),
    ],
)
def test_core_turns_are_taken_where_threads_outnumber_the_cores(
    monkeypatch, tmp_path, mode, device, colocated, threads, cores, on
):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr("inference.core_turns.os.cpu_count", lambda: cores)
    sched = FakeScheduler()
    policy = ThreadPolicy(sched, threads, mode, device)
    policy.fit(colocated)
    assert (sched.turns is not None) == on and sched.colocated == (colocated > 1)
    policy.fit(1)  # alone again: auto stops taking turns
    assert (sched.turns is not None) == (mode == "on") and not sched.colocated
    policy.close()


def test_threads_are_the_flag_else_omp_num_threads_else_every_core(monkeypatch):
    monkeypatch.setattr("inference.core_turns.os.cpu_count", lambda: 6)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert ThreadPolicy(FakeScheduler(), 2).threads == 2
    assert ThreadPolicy(FakeScheduler(), None).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    sched = FakeScheduler()
    policy = ThreadPolicy(sched, 0)
    assert policy.threads == 6
    run(policy.set_threads())  # set on the compute thread, where forwards run
    assert sched.computed == [(torch.set_num_threads, (6,))]


def test_colocated_peers_share_this_peers_host():
    live = ["10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:8000"]
    assert colocated_peers("10.0.0.1:8000", live) == 2
    assert colocated_peers("10.0.0.3:8000", live) == 1  # (itself, even before its table knows it)
