"""A peer stops cleanly on SIGTERM (at once on a second) and refuses bad flags with one line."""

import signal
import subprocess
import sys
import time

import httpx
import torch

from peers.local_swarm import serve_command
from peers.transport.frames import PATH_STEPS, STEP_CONTENT_TYPE, Hop, Sampling, StepRequest, encode_steps
from tests.peers.processes import wait_until


def test_sigterm_stops_a_peer_cleanly(tiny_llama, make_swarm):
    swarm = make_swarm(tiny_llama)
    peer = swarm.add("0:4")
    swarm.wait_ready()
    health = peer.health()
    assert health["state"] == "serving" and health["layers"] == [0, 4] and health["model"] == "llama"
    peer.signal(signal.SIGTERM)
    wait_until(lambda: peer.proc.poll() is not None, 20)
    assert peer.proc.returncode == 0, peer.log_tail()
    assert "Traceback" not in peer.log_tail(200)


def test_a_second_sigterm_stops_at_once_while_the_first_drains(tiny_llama, make_swarm):
    """A session left open keeps a leaving peer draining (up to --drain, 10 s by default); a
    second signal ends that at once."""
    swarm = make_swarm(tiny_llama)
    peer = swarm.add("0:4")
    swarm.wait_ready()
    route = [Hop(peer.peer_id, peer.address, 0, 4)]
    body = encode_steps([StepRequest("s", 0, route, Sampling(), torch.tensor([[5, 6, 7]]))])  # never closed
    r = httpx.post(f"{peer.url}{PATH_STEPS}", content=body, headers={"content-type": STEP_CONTENT_TYPE})
    assert r.status_code == 200 and "tokens" in r.json()["results"][0], r.text
    peer.signal(signal.SIGTERM)
    wait_until(lambda: peer.health() is None or peer.health()["state"] == "leaving", 5)
    time.sleep(0.5)
    assert peer.alive()  # still draining
    started = time.monotonic()
    peer.signal(signal.SIGTERM)
    wait_until(lambda: peer.proc.poll() is not None, 20)
    assert time.monotonic() - started < 4, peer.log_tail()
    assert peer.proc.returncode == 0, peer.log_tail()


def test_serve_rejects_a_bad_layer_range(tiny_llama):
    cmd = serve_command(tiny_llama, 1, "3:9")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1]
        == "peer: error: layers 3:9 are not a non-empty range inside [0, 4)"
    )


def test_serve_help_documents_every_flag():
    done = subprocess.run(
        [sys.executable, "-m", "peers.cli", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    for flag in (
        "--model",
        "--layers",
        "--join",
        "--device",
        "--dtype",
        "--public-address",
        "--port",
        "--host",
    ):
        assert flag in done.stdout
