"""The peers that the hostile-input tests attack: three of the tiny Llama with short HTTP timeouts
and a connection cap (test_hostile.py, test_hostile_http.py); a completion request, raw bytes
over a socket, and a peer's resident memory."""

import socket
from pathlib import Path

import httpx

from tests.peers.processes import Peer, tiny_route

GUARDS = ["--header-timeout", "1", "--read-timeout", "1", "--max-connections", "48"]


def guarded_swarm(model: str | Path, log_dir: Path):
    """Peers 0:1, 1:3 and 3:4 with GUARDS, each with a route; stopped on leaving."""
    return tiny_route(model, log_dir, GUARDS)


def completion(peer: Peer, prompt: str = "hello", max_tokens: int = 4, **extra) -> httpx.Response:
    body = {"model": "llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{peer.url}/v1/completions", json=body, timeout=60)


def raw(peer: Peer, data: bytes, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", peer.port), timeout=timeout)
    s.sendall(data)
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def rss_kib(peer: Peer) -> int:
    with open(f"/proc/{peer.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
