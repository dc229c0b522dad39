"""A volunteer behind a home router, proven across network namespaces (tests/netbench.py): a
public peer on "the internet", and a peer at home behind an iptables NAT that drops everything
it did not ask for. The home peer joins by dialling out, learns by dial-back that nobody can
dial it (`reach: none`), serves its own users exactly (their results stay on its own
connections), and the public peer never routes through it (it could not dial it, so it never
vouched for it)."""

import json
import os
import subprocess
import sys

import httpx
import pytest
from transformers import AutoTokenizer

from tests.helpers import greedy_reference, monolithic
from tests.netbench import available, small_internet
from tests.peers.processes import ROOT, Peer, Swarm, wait_until

# (skipped on a developer's machine without root; never in CI, which runs as root: there it must pass)
pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(available() is not None and not os.environ.get("CI"), reason=str(available())),
]

PROMPTS = ("hello there", "a peer behind a router")


def inside(prefix: list[str], url: str, body: dict | None = None, timeout_s: float = 60) -> dict:
    """GET (or POST `body` to) `url` from inside a namespace: what a user at home would do."""
    code = (
        "import httpx, json, sys\n"
        "body = json.loads(sys.argv[2])\n"
        "r = httpx.post(sys.argv[1], json=body, timeout=float(sys.argv[3])) if body else "
        "httpx.get(sys.argv[1], timeout=float(sys.argv[3]))\n"
        "print(json.dumps({'status': r.status_code, 'body': r.json()}))"
    )
    out = subprocess.run(
        [*prefix, sys.executable, "-c", code, url, json.dumps(body or {}), str(timeout_s)],
        capture_output=True, text=True, timeout=timeout_s + 30, cwd=ROOT,
    )  # fmt: skip
    if out.returncode != 0:
        return {"status": None, "body": out.stderr[-500:]}
    return json.loads(out.stdout)


def in_namespace(swarm: Swarm, prefix: list[str], ip: str, layers: str, join: list[str]) -> Peer:
    peer = Peer(swarm.model, layers, join, swarm.log_dir, swarm.args, swarm.threads)
    peer.host, peer.prefix = "0.0.0.0", prefix
    peer.address = peer.public = f"{ip}:{peer.port}"
    peer.args = [*peer.args, "--public-address", peer.address]
    swarm.peers.append(peer.start())
    return peer


def test_a_peer_behind_nat_joins_serves_its_users_and_is_not_routed_through(tiny_llama, tmp_path):
    tok, model = AutoTokenizer.from_pretrained(tiny_llama), monolithic(tiny_llama)
    wants = [tok.decode(greedy_reference(model, tok.encode(p), 8), skip_special_tokens=True) for p in PROMPTS]
    with small_internet() as net:
        # (peers listening beyond loopback check a share of hops by default, and checked steps come
        # back nested anyway: without checks the home entry's steps would be returned directly)
        swarm = Swarm(tiny_llama, tmp_path, ["--verify-rate", "0"])
        try:
            public = in_namespace(swarm, net.exec(net.inet), net.public_ip, "0:4", [])
            swarm.wait_ready([public])  # (this process reaches the internet)
            home = in_namespace(swarm, net.exec(net.home), net.home_ip, "0:2", [public.address])

            def home_health() -> dict:
                answer = inside(net.exec(net.home), f"http://{home.address}/health", timeout_s=5)
                return answer["body"] if answer["status"] == 200 else {}

            wait_until(lambda: home_health().get("reach") == "none", 90, lambda: swarm._why())
            for prompt, want in zip(PROMPTS, wants, strict=True):
                body = {
                    "model": "llama",
                    "prompt": prompt,
                    "max_tokens": 8,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                answer = inside(net.exec(net.home), f"http://{home.address}/v1/completions", body)
                assert answer["status"] == 200, answer
                assert answer["body"]["choices"][0]["text"] == want
                r = httpx.post(f"{public.url}/v1/completions", json=body, timeout=60)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
            assert home_health()["direct_return"]["results_taken"] == 0
            # the public peer knows the home peer (its own gossip came out) but cannot vouch for it
            seen = [p for p in public.table()["peers"] if p["address"] == home.address]
            assert seen and not any(p["vouched"] for p in seen), seen
        finally:
            swarm.stop()
