"""The `peer` command fails on bad input with one line and a non-zero exit, no traceback."""

import asyncio
import os
import socket
import subprocess
import sys

import pytest

import peers
from peers import cli


def run_peer(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "peers.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", "0:2,2:9"], "layers 2:9 are not a non-empty range inside [0, 4)"),
        (["--split", "0:2,2:2"], "layers 2:2 are not a non-empty range"),
        (["--split", "0:1,2:4"], "do not tile [0, 4) in order"),
    ],
)
def test_bad_layer_split(tiny_llama, args, message):
    done = run_peer("generate", "hi", "--model", str(tiny_llama), *args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"peer: error: {message}" or message in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_model():
    done = run_peer("generate", "hi", "--model", "no-such-model")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "peer: error: unknown model 'no-such-model'" in done.stderr


def test_generate_prints_text(tiny_llama):
    done = run_peer("generate", "hi", "--model", str(tiny_llama), "--split", "0:3,3:4", "--max-tokens", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_connections_to_a_peer_send_at_once():
    """A reply's body must not wait behind its headers for the client's delayed ACK (Nagle,
    ~40 ms a hop): asyncio sets TCP_NODELAY on accepted connections only when the listening
    socket names IPPROTO_TCP."""
    sock = cli._listen("127.0.0.1", 0)

    async def main():
        seen = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            seen.set_result(
                writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            )
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)  # as uvicorn serves it
        try:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            nodelay = await asyncio.wait_for(seen, 10)
            writer.close()
            return nodelay
        finally:
            server.close()

    assert asyncio.run(main()) != 0


@pytest.mark.parametrize(
    ("flag", "env", "policy", "spins"),
    [
        (None, {}, "PASSIVE", str(cli.BRIEF_SPINS)),  # the default: brief
        ("brief", {"GOMP_SPINCOUNT": "5000"}, "PASSIVE", "5000"),  # an explicit spin count wins
        ("passive", {"GOMP_SPINCOUNT": "5000"}, "PASSIVE", None),
        ("active", {}, "ACTIVE", None),
        (None, {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE", None),  # the environment's, untouched
    ],
)
def test_omp_wait_policy(monkeypatch, flag, env, policy, spins):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cli._set_wait_policy(flag)
    assert os.environ.get("OMP_WAIT_POLICY") == policy
    assert os.environ.get("GOMP_SPINCOUNT") == spins


@pytest.mark.parametrize(
    ("argv", "env_key", "rate"),
    [
        ([], None, 0.0),  # loopback: a local swarm of one's own
        (["--host", "0.0.0.0"], None, cli.OPEN_SWARM_VERIFY_RATE),  # strangers may join
        (["--host", "0.0.0.0"], "a private swarm key!", 0.0),  # members only
        (["--host", "0.0.0.0", "--verify-rate", "0.25"], None, 0.25),
        (["--verify-rate", "1"], None, 1.0),
    ],
)
def test_verify_rate_defaults_to_checking_in_an_open_swarm(monkeypatch, argv, env_key, rate):
    if env_key:
        monkeypatch.setenv("LAYERSWARM_SWARM_KEY", env_key)
    else:
        monkeypatch.delenv("LAYERSWARM_SWARM_KEY", raising=False)
    args = cli.build_parser().parse_args(["serve", "--layers", "0:4", *argv])
    assert cli._verify_rate(args) == rate


def test_swarm_presets_are_found_outside_the_checkout(tmp_path, monkeypatch):
    """configs/ ships in the package: `peer swarm --config NAME` works from any directory."""
    import tomllib

    from peers.local_swarm import read_preset

    monkeypatch.chdir(tmp_path)
    for name in ("local-smollm2", "local-smollm2.toml", "configs/local-smollm2.toml"):
        assert tomllib.loads(read_preset(name))["model"] == "smollm2-135m"
    (tmp_path / "mine.toml").write_text('model = "x"\n')
    assert read_preset("mine.toml") == 'model = "x"\n'  # a file wins
    with pytest.raises(ValueError, match="local-smollm2"):
        read_preset("nonexistent")


def test_version_names_the_installed_package():
    from importlib.metadata import version

    done = run_peer("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"peer (layerswarm) {version('layerswarm')}\n"
    assert peers.__version__ == version("layerswarm")
