"""One core (or more) per peer: --cpus read, checked and pinned (the whole peer process, seen in
/proc and /health), its threads, core turns only among peers whose cores overlap, and how a
local swarm splits a machine's cores."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from inference.core_turns import CoreTurns, ThreadPolicy
from peers.config import NodeConfig
from peers.cores import check_cpus, format_cpus, parse_cpus, split_cpus, usable_cpus
from peers.local_swarm import core_layout
from tests.peers.processes import Swarm, free_port, wait_until


class FakeScheduler:
    colocated = False
    turns = None

    async def run_in_compute(self, fn, *args):
        return fn(*args)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [(None, ()), ("0", (0,)), ("0,1", (0, 1)), ("2-3", (2, 3)), ("5, 0-1,1", (0, 1, 5))],
)
def test_cpu_lists_read_as_core_numbers(text, cpus):
    assert parse_cpus(text) == cpus
    if cpus:
        assert parse_cpus(format_cpus(cpus)) == cpus
    assert format_cpus((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "--cpus takes core numbers and ranges such as 0,2-3, got ''"),
        ("a", "--cpus takes core numbers"),
        ("1-", "--cpus takes core numbers"),
        ("-1", "--cpus takes core numbers"),
        ("3-2", "--cpus: the range 3-2 runs backwards"),
    ],
)
def test_bad_cpu_lists_are_refused(text, message):
    with pytest.raises(ValueError) as caught:
        parse_cpus(text)
    assert str(caught.value).startswith(message)


def test_cores_the_process_may_not_use_are_refused():
    beyond = max(usable_cpus()) + 1
    with pytest.raises(ValueError, match=f"names cores {beyond} that this machine does not have"):
        check_cpus("cpus", (0, beyond))
    with pytest.raises(ValueError, match=f"cpus 0,{beyond} names cores {beyond}"):
        NodeConfig(cpus=(0, beyond))


def test_more_threads_than_cores_given_are_refused():
    with pytest.raises(ValueError) as caught:
        NodeConfig(cpus=(0,), threads=2)
    assert str(caught.value).startswith("--threads 2 is more than the cores --cpus 0 gives (1)")
    assert NodeConfig(cpus=(0,), threads=1).threads == 1


@pytest.mark.parametrize(
    ("peers", "cores", "split"),
    [
        (1, 2, [(0, 1)]),
        (2, 2, [(0,), (1,)]),
        (3, 2, None),  # fewer cores than peers: they share them, in turns
        (3, 3, [(0,), (1,), (2,)]),
        (3, 4, [(0, 1), (2,), (3,)]),
        (3, 8, [(0, 1, 2), (3, 4, 5), (6, 7)]),
    ],
)
def test_a_local_swarm_gives_each_peer_cores_of_its_own_when_it_can(peers, cores, split):
    assert split_cpus(peers, tuple(range(cores))) == split
    flags, says = core_layout(peers, tuple(range(cores)))
    if split is None:
        assert flags == [[]] * peers and "take turns" in says
    else:
        assert flags == [["--cpus", format_cpus(own)] for own in split] and "cores of its own" in says
        assert all(set(a).isdisjoint(b) for i, a in enumerate(split) for b in split[i + 1 :])
    assert core_layout(peers, tuple(range(cores)), named=True)[0] == [[]] * peers


def test_a_peer_on_its_own_cores_takes_no_turns_and_threads_follow_its_cores(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    sched = FakeScheduler()
    policy = ThreadPolicy(sched, 0, "auto", None, cpus=(0,))
    assert policy.threads == 1 and policy.cores == (0,)  # --cpus' count before OMP_NUM_THREADS
    assert ThreadPolicy(FakeScheduler(), 1, cpus=(0, 1)).threads == 1  # --threads wins
    policy.fit(3)  # three peers on this host, however few cores
    assert sched.turns is None and not sched.colocated  # no turns, no waves: the cores are its own
    on = ThreadPolicy(sched, 0, "on", None, cpus=(1,))
    on.fit(3)
    assert sched.turns.paths == [str(tmp_path / f"layerswarm-{os.getuid()}-core-1.lock")]
    on.close()


def test_turns_are_taken_only_among_peers_whose_cores_overlap(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    holder = CoreTurns(cores=(0,), max_wait_s=5)
    disjoint, overlapping = CoreTurns(cores=(1,), max_wait_s=5), CoreTurns(cores=(0, 1), max_wait_s=0.2)
    third = CoreTurns(cores=(1,), max_wait_s=0.2)
    try:
        with holder:
            with disjoint:  # core 1 is free: no wait at all
                assert disjoint.turns == 1 and disjoint.skipped == 0 and disjoint.wait_s < 1
            with overlapping:  # core 0 is held: no turn within its wait
                pass
            assert overlapping.skipped == 1
        time.sleep(0.5)  # the given-up ask takes the cores once they are free, and gives them back
        with overlapping:  # a turn again, holding cores 0 and 1: now a peer on core 1 waits
            assert overlapping.turns == 1
            with third:
                pass
            assert third.skipped == 1
    finally:
        for turns in (holder, disjoint, overlapping, third):
            turns.close()


def test_bad_cpus_stop_peer_serve_with_a_message_before_it_loads_anything():
    beyond = max(usable_cpus()) + 1
    cases = {
        f"0,{beyond}": f"peer: error: --cpus 0,{beyond} names cores {beyond} that this machine does not have",
        "x": "peer: error: --cpus takes core numbers and ranges such as 0,2-3, got 'x'",
    }
    for text, message in cases.items():
        done = subprocess.run(
            [sys.executable, "-m", "peers.cli", "serve", "--cpus", text],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and done.stderr.startswith(message), done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "peers.cli", "serve", "--cpus", "0", "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--threads 2 is more than the cores --cpus 0 gives (1)" in done.stderr


def thread_cpus(pid: int) -> dict[str, str]:
    """Each thread of process `pid` and the cores it may run on (as /proc writes them)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        out[tid] = next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
        out[tid] = out[tid].split(":", 1)[1].strip()
    return out


@pytest.mark.processes
def test_a_peer_started_with_cpus_runs_on_those_cores(tiny_llama, tmp_path):
    swarm = Swarm(tiny_llama, tmp_path, threads=None)  # no OMP_NUM_THREADS: threads from --cpus
    try:
        peer = swarm.add("0:4", args=["--cpus", "0"])
        swarm.wait_ready()
        assert os.sched_getaffinity(peer.proc.pid) == {0}
        status = Path(f"/proc/{peer.proc.pid}/status").read_text()
        assert "Cpus_allowed_list:\t0\n" in status
        threads = thread_cpus(peer.proc.pid)  # every thread of it, torch's included
        assert len(threads) > 1 and all(cpus == "0" for cpus in threads.values()), threads
        health = httpx.get(f"{peer.url}/health", timeout=5).json()
        assert health["cpus"] == [0] and health["threads"] == 1 and health["core_turns"] is False
    finally:
        swarm.stop()


@pytest.mark.processes
def test_peer_swarm_gives_its_peers_cores_of_their_own_when_there_are_enough(tiny_llama, tmp_path):
    ports = [free_port(), free_port()]
    preset = tmp_path / "two.toml"
    peers = "".join(
        f'[[peers]]\nport = {port}\nlayers = "{span}"\n'
        for port, span in zip(ports, ("0:2", "2:4"), strict=True)
    )
    preset.write_text(f'model = "{tiny_llama}"\nhost = "127.0.0.1"\n{peers}')
    split = split_cpus(2, usable_cpus())
    log = tmp_path / "swarm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "peers.cli", "swarm", "--config", str(preset)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "LayerSwarm is serving" in log.read_text(), 120, log.read_text)
        said = log.read_text()
        cpus = [httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["cpus"] for port in ports]
        if split is None:  # one core: the two peers share it, in turns
            assert "take turns" in said and cpus == [list(usable_cpus())] * 2
        else:
            assert "each peer on cores of its own" in said and cpus == [list(own) for own in split]
    finally:
        proc.send_signal(signal.SIGTERM)  # it stops its peers
        proc.wait(60)
