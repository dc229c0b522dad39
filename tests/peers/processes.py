"""Real peer processes on free loopback ports, for end-to-end tests. Every peer started here is
stopped by the owning fixture, whatever happens."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from peers.local_swarm import serve_command
from peers.transport.auth import SwarmAuth, swarm_key_from

START_TIMEOUT_S = 120.0
ROOT = Path(__file__).resolve().parents[2]
STORY = "Write a long story about a dragon and a knight."


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, never the same twice in this process (the kernel may
    hand a just-closed port out again). Under pytest-xdist each worker draws from its own range,
    so two workers never hand out one port between its check and its peer's bind."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.removeprefix("gw").isdigit():
        return _any_free_port()
    low = 20000 + 2000 * int(worker.removeprefix("gw"))
    while True:
        port = random.randrange(low, low + 2000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


def _any_free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class Peer:
    def __init__(
        self,
        model: Path | str,
        layers: str | None,
        join: list[str],
        log_dir: Path,
        args: list[str],
        threads: int | None,
        patch: str | None = None,
    ):
        self.patch = patch  # Python run in the peer's process before it starts (a lying peer)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.model, self.layers, self.join, self.args, self.log_dir = model, layers, join, args, log_dir
        self.threads = threads
        self._peer_id: str | None = None
        self.proc: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None  # a delay proxy in front of it (tests/delay_proxy.py)
        self.public = self.address  # what other peers dial: the proxy's address, if it has one
        self.host = "127.0.0.1"  # what it listens on
        self.prefix: list[str] = []  # what its command runs under (e.g. `ip netns exec NAME`)
        self.log_path = log_dir / f"peer-{self.port}.log"

    @property
    def identity_path(self) -> Path:
        """Its key: kept across restarts on its port, as a volunteer's peer keeps its identity."""
        return self.log_dir / f"peer-{self.port}.key"

    @property
    def peer_id(self) -> str:
        """Its peer id (derived from its key; read from /health, ready or not)."""
        if self._peer_id is None:
            self._peer_id = httpx.get(f"{self.url}/health", timeout=5).json()["peer_id"]
        return self._peer_id

    def start(self) -> "Peer":
        self._peer_id = None
        args = [*self.args, "--identity", str(self.identity_path)]
        cmd = serve_command(self.model, self.port, self.layers, self.join, self.host, args=args)
        if self.patch:  # python -m peers.cli ARGS -> python -c "PATCH; main(ARGS)" ARGS
            code = f"{self.patch}\nimport sys\nfrom peers.cli import main\nsys.exit(main(sys.argv[1:]))"
            cmd = [cmd[0], "-c", code, *cmd[3:]]
        cmd = [*self.prefix, *cmd]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 15.0) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def behind_proxy(self, delay_ms: float, jitter_ms: float = 0.0) -> None:
        """Put a delay proxy in front of it (before start): other peers dial the proxy."""
        port = free_port()
        self.public = f"127.0.0.1:{port}"
        self.args = [*self.args, "--public-address", self.public]
        cmd = [sys.executable, "-m", "tests.delay_proxy", "--listen", self.public, "--to", self.address]
        cmd += ["--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms)]
        self.proxy = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop_proxy(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            self.proxy.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def health(self) -> dict | None:
        try:
            r = httpx.get(f"{self.url}/health", timeout=2)
            return r.json() if r.status_code == 200 else None
        except httpx.HTTPError:
            return None

    def table(self) -> dict:
        key = swarm_key_from(None)  # a private swarm's (LAYERSWARM_SWARM_KEY), if any
        return httpx.get(f"{self.url}/swarm/table", timeout=5, auth=SwarmAuth(key) if key else None).json()


class Swarm:
    """A set of peers; `stop()` ends them all."""

    def __init__(self, model: Path | str, log_dir: Path, args: list[str] = (), threads: int | None = 1):
        self.model, self.log_dir, self.args, self.threads = model, log_dir, list(args), threads
        self.peers: list[Peer] = []

    def add(
        self,
        layers: str | None,
        join: list[str] | None = None,
        args: list[str] = (),
        port: int | None = None,
        patch: str | None = None,
        delay_ms: float | None = None,
        jitter_ms: float = 0.0,
    ) -> Peer:
        """Start a peer; with `delay_ms`, behind a delay proxy that other peers dial."""
        if join is None:
            join = [self.peers[0].public] if self.peers else []
        peer = Peer(self.model, layers, join, self.log_dir, self.args + list(args), self.threads, patch)
        if port is not None:
            peer.port, peer.address = port, f"127.0.0.1:{port}"
            peer.public = peer.address
            peer.log_path = self.log_dir / f"peer-{port}-{time.monotonic_ns()}.log"
        if delay_ms is not None:
            peer.behind_proxy(delay_ms, jitter_ms)
        self.peers.append(peer.start())
        return peer

    def wait_ready(self, peers: list[Peer] | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
        wait_until(lambda: all(p.health() for p in peers or self.peers), timeout_s, self._why)

    def wait_route(self, entry: Peer, timeout_s: float = START_TIMEOUT_S) -> None:
        wait_until(lambda: entry.health() and not entry.table()["gaps"], timeout_s, self._why)

    def _why(self) -> str:
        return "\n\n".join(f"--- {p.address} (alive={p.alive()})\n{p.log_tail()}" for p in self.peers)

    def stop(self) -> None:
        """Every peer leaves at once (a first SIGTERM), then stops without draining (a second one:
        sent at once, the two would be one signal, and a peer holding a session the test left
        open would drain for its whole drain_s)."""
        for p in self.peers:
            p.signal(signal.SIGTERM)
        time.sleep(0.3)
        for p in self.peers:
            p.stop()
            p.stop_proxy()


@contextmanager
def tiny_route(model: Path | str, log_dir: Path, args: list[str] | tuple[str, ...] = ()) -> Iterator[Swarm]:
    """Three peers of a 4-layer model, 0:1, 1:3 and 3:4 (with `args`), each with a complete
    route; stopped on leaving."""
    swarm = Swarm(model, log_dir, list(args))
    try:
        for layers in ("0:1", "1:3", "3:4"):
            swarm.add(layers)
        swarm.wait_ready()
        for peer in swarm.peers:
            swarm.wait_route(peer)
        yield swarm
    finally:
        swarm.stop()


def wait_until(condition, timeout_s: float, why=lambda: "", interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = condition()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s\n{why()}")


def stream_chat(
    entry, on_token=None, n=64, temperature=0.0, seed=None, prompt=STORY, model="smollm2-135m", comments=None
):
    """A streamed chat completion; returns (text, finish_reason, gaps between tokens); the
    stream's comment lines (keep-alives) go to the list `comments`, if given."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": n,
        "temperature": temperature,
        "ignore_eos": True,
        "stream": True,
    }
    if seed is not None:
        body["seed"] = seed
    text, finish, stamps = [], None, []
    with httpx.stream("POST", f"{entry.url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith(":") and comments is not None:
                comments.append(line)
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            choice = event["choices"][0]
            if choice["delta"].get("content"):
                text.append(choice["delta"]["content"])
                stamps.append(time.monotonic())
                if on_token:
                    on_token(len(text))
            finish = choice["finish_reason"] or finish
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return "".join(text), finish, gaps


def serving_replica(swarm: Swarm, layers: str) -> Peer:
    """The live replica of `layers` that holds the running session."""
    replicas = [p for p in swarm.peers if p.layers == layers and p.alive()]
    return wait_until(lambda: next((p for p in replicas if (p.health() or {}).get("sessions")), None), 10)
