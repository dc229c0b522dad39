"""The `peer` command: its flags (generated from the declared options) stay as they were, they build
the settings they name, and bad input fails with one line and a non-zero exit, no traceback."""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys

import pytest

import peers
from peers import cli
from peers.config import NodeConfig
from peers.option_values import OPEN_SWARM_VERIFY_RATE, on_off, read_verify_rate
from peers.options import read_config


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
        (["--host", "0.0.0.0"], None, OPEN_SWARM_VERIFY_RATE),  # strangers may join
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
    assert read_verify_rate(args) == rate


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


# Every subcommand's flags as they were before the parser was generated from declarations:
# (default, type, choices, metavar, nargs, action) by option string (a positional by its name).
FLAGS = {
    "serve": {
        "--model": ("smollm2-135m", None, None, None, None, "StoreAction"),
        "--layers": (None, None, None, None, None, "StoreAction"),
        "--num-layers": (None, int, None, None, None, "StoreAction"),
        "--host": ("127.0.0.1", None, None, None, None, "StoreAction"),
        "--port": (7001, int, None, None, None, "StoreAction"),
        "--public-address": (None, None, None, None, None, "StoreAction"),
        "--join": (None, None, None, "HOST:PORT", "+", "StoreAction"),
        "--device": (None, None, None, None, None, "StoreAction"),
        "--dtype": (None, None, None, None, None, "StoreAction"),
        "--quant": ("none", None, ("none", "int8", "int4"), None, None, "StoreAction"),
        "--cpus": (None, str, None, "LIST", None, "StoreAction"),
        "--threads": (None, int, None, None, None, "StoreAction"),
        "--core-turns": ("auto", None, ("auto", "on", "off"), None, None, "StoreAction"),
        "--cuda-graphs": ("auto", None, ("auto", "on", "off"), None, None, "StoreAction"),
        "--max-cache-tokens": (65536, int, None, None, None, "StoreAction"),
        "--max-batch-tokens": (512, int, None, None, None, "StoreAction"),
        "--prefill-chunk": (256, int, None, None, None, "StoreAction"),
        "--max-step-queue": (1024, int, None, None, None, "StoreAction"),
        "--max-queue-wait": (10.0, float, None, None, None, "StoreAction"),
        "--batch-wait": (None, float, None, None, None, "StoreAction"),
        "--micro-batches": (True, on_off, None, "on|off", None, "StoreAction"),
        "--no-hop-stream": (False, None, None, None, 0, "StoreTrueAction"),
        "--no-prefix-reuse": (False, None, None, None, 0, "StoreTrueAction"),
        "--generation-config": ("auto", None, ("auto", "none"), None, None, "StoreAction"),
        "--wire": ("lossless", None, ("lossless", "bf16", "fp16", "int8"), None, None, "StoreAction"),
        "--no-direct-return": (False, None, None, None, 0, "StoreTrueAction"),
        "--draft-model": (None, None, None, None, None, "StoreAction"),
        "--no-speculative": (False, None, None, None, 0, "StoreTrueAction"),
        "--prefix-cache-tokens": (16384, int, None, None, None, "StoreAction"),
        "--session-idle": (120.0, float, None, None, None, "StoreAction"),
        "--hop-timeout": (30.0, float, None, None, None, "StoreAction"),
        "--hop-timeout-per-token": (0.02, float, None, None, None, "StoreAction"),
        "--failover-timeout": (60.0, float, None, None, None, "StoreAction"),
        "--sse-keepalive": (5.0, float, None, None, None, "StoreAction"),
        "--ban": (5.0, float, None, None, None, "StoreAction"),
        "--verify-rate": (None, float, None, None, None, "StoreAction"),
        "--self-referee": (False, None, None, None, 0, "StoreTrueAction"),
        "--liar-ban": (3600.0, float, None, None, None, "StoreAction"),
        "--drain": (10.0, float, None, None, None, "StoreAction"),
        "--max-requests": (64, int, None, None, None, "StoreAction"),
        "--max-waiting": (256, int, None, None, None, "StoreAction"),
        "--max-body-bytes": (4194304, int, None, None, None, "StoreAction"),
        "--read-timeout": (10.0, float, None, None, None, "StoreAction"),
        "--header-timeout": (10.0, float, None, None, None, "StoreAction"),
        "--swarm-key": (None, None, None, None, None, "StoreAction"),
        "--api-key": (None, None, None, None, None, "AppendAction"),
        "--api-key-file": (None, None, None, None, None, "StoreAction"),
        "--metrics-key": (None, None, None, None, None, "StoreAction"),
        "--served-model-name": (None, None, None, "NAME", "+", "StoreAction"),
        "--chat-template": (None, None, None, "TEMPLATE", None, "StoreAction"),
        "--allowed-origins": (None, None, None, "ORIGIN[,ORIGIN...]", None, "StoreAction"),
        "--identity": (None, None, None, "FILE", None, "StoreAction"),
        "--max-connections": (2048, int, None, None, None, "StoreAction"),
        "--no-rebalance": (False, None, None, None, 0, "StoreTrueAction"),
        "--gossip-interval": (1.0, float, None, None, None, "StoreAction"),
        "--gossip-fanout": (3, int, None, None, None, "StoreAction"),
        "--suspect-after": (4.0, float, None, None, None, "StoreAction"),
        "--dead-after": (8.0, float, None, None, None, "StoreAction"),
        "--tombstone": (60.0, float, None, None, None, "StoreAction"),
        "--omp-wait-policy": (None, None, ("brief", "passive", "active"), None, None, "StoreAction"),
        "--log-level": ("warning", None, None, None, None, "StoreAction"),
        "--log-format": ("text", None, ("text", "json"), None, None, "StoreAction"),
    },
    "status": {
        "--peer": ("127.0.0.1:7001", None, None, None, None, "StoreAction"),
        "--timeout": (5.0, float, None, None, None, "StoreAction"),
        "--swarm-key": (None, None, None, None, None, "StoreAction"),
        "--json": (False, None, None, None, 0, "StoreTrueAction"),
        "--watch": (None, float, None, "SECONDS", "?", "StoreAction"),
    },
    "swarm": {
        "--config": ("configs/local-smollm2.toml", None, None, None, None, "StoreAction"),
        "--model": (None, None, None, None, None, "StoreAction"),
        "--served-model-name": (None, None, None, "NAME", "+", "StoreAction"),
        "--quant": (None, None, ("none", "int8", "int4"), None, None, "StoreAction"),
    },
    "generate": {
        "prompt": (None, None, None, None, None, "StoreAction"),
        "--model": ("smollm2-135m", None, None, None, None, "StoreAction"),
        "--split": ("0:10,10:20,20:30", None, None, None, None, "StoreAction"),
        "--max-tokens": (64, int, None, None, None, "StoreAction"),
        "--temperature": (0.0, float, None, None, None, "StoreAction"),
        "--seed": (None, int, None, None, None, "StoreAction"),
        "--device": (None, None, None, None, None, "StoreAction"),
        "--dtype": (None, None, None, None, None, "StoreAction"),
        "--quant": ("none", None, ("none", "int8", "int4"), None, None, "StoreAction"),
    },
    "plan": {
        "--model": ("smollm2-135m", None, None, None, None, "StoreAction"),
        "--gpus": (None, None, None, None, None, "StoreAction"),
        "--quant": ("none", None, ("none", "int8", "int4"), None, None, "StoreAction"),
        "--dtype": ("bfloat16", None, None, None, None, "StoreAction"),
        "--reserve-gb": (None, float, None, None, None, "StoreAction"),
        "--json": (False, None, None, None, 0, "StoreTrueAction"),
    },
}


def test_flags_are_as_declared_before():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(FLAGS)
    for name, command in commands.items():
        seen = {
            (a.option_strings or [a.dest])[0]: (
                a.default,
                a.type,
                tuple(a.choices) if a.choices else None,
                a.metavar,
                a.nargs,
                type(a).__name__.strip("_"),
            )
            for a in command._actions
            if a.dest != "help"
        }
        assert seen == FLAGS[name], name


def test_flags_build_the_settings_they_name(monkeypatch):
    monkeypatch.delenv("LAYERSWARM_SWARM_KEY", raising=False)
    argv = "serve --layers 0:4 --join a:1 b:2 --port 7005 --session-idle 9 --no-speculative --no-rebalance "
    argv += "--served-model-name x y --allowed-origins http://a.example,* --max-batch-tokens 64 "
    argv += "--batch-wait 0 --gossip-interval 0.5 --suspect-after 2 --identity id.pem --wire int8"
    config = NodeConfig(**read_config(NodeConfig, cli.build_parser().parse_args(argv.split())))
    from inference.scheduler import SchedulerSettings
    from peers.swarm.membership import GossipSettings

    assert config == NodeConfig(
        layers="0:4",
        join=("a:1", "b:2"),
        port=7005,
        session_idle_s=9.0,
        speculative=False,
        rebalance=False,
        served_model_names=("x", "y"),
        allowed_origins=("http://a.example", "*"),
        scheduler=SchedulerSettings(max_batch_tokens=64, batch_wait_s=0.0),
        gossip=GossipSettings(interval_s=0.5, suspect_after_s=2.0),
        identity_file="id.pem",
        wire="int8",
    )
    default = NodeConfig(**read_config(NodeConfig, cli.build_parser().parse_args(["serve"])))
    assert default == NodeConfig()


def test_the_engine_names_written_for_the_parser_agree_with_the_engine():
    """peers/config.py writes these out so that building the parser never imports torch."""
    from dataclasses import asdict

    from inference import DEFAULT_MODEL, QUANT_MODES
    from inference.scheduler import SchedulerSettings
    from peers import config
    from peers.transport.wire import ENCODINGS

    assert config.DEFAULT_MODEL == DEFAULT_MODEL
    assert config.QUANT_CHOICES == QUANT_MODES
    assert config.WIRE_CHOICES == ENCODINGS
    scheduler = {name: flag.default for name, flag in config.SCHEDULER_FLAGS.items()}
    assert scheduler == asdict(SchedulerSettings())


def test_the_parser_does_not_load_torch():
    """--omp-wait-policy must be set before torch loads, and `peer --help` stays quick."""
    code = "import sys; from peers.cli import build_parser; build_parser().parse_args(['serve']); "
    code += "assert 'torch' not in sys.modules, 'torch loaded'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"port": 0}, "port must be in 1..65535, got 0"),
        ({"hop_timeout_s": 0}, "hop_timeout_s must be positive, got 0"),
        ({"hop_timeout_per_token_s": -1}, "hop_timeout_per_token_s must be >= 0, got -1"),
        ({"threads": 0}, "threads must be >= 1, got 0"),
        ({"wire": "gzip"}, "wire must be one of lossless, bf16, fp16, int8, got 'gzip'"),
        ({"quant": "int2"}, "quant must be one of none, int8, int4, got 'int2'"),
        ({"verify_rate": 2}, "verify_rate must be in [0, 1], got 2"),
        ({"prefix_cache_tokens": -1}, "prefix_cache_tokens must be >= 0, got -1"),
        ({"liar_ban_s": 0}, "liar_ban_s must be positive, got 0"),
        ({"cuda_graphs": "on"}, "cuda_graphs 'on' needs a CUDA device, got device 'cpu'"),
        ({"draft_model": "x", "speculative": False}, "a draft model has no use without speculative"),
    ],
)
def test_each_check_names_the_bad_value(values, message):
    with pytest.raises(ValueError) as caught:
        NodeConfig(**values)
    assert str(caught.value).startswith(message)


def _tiny_config(path, **kw):
    """A Qwen3-MoE config alone (no weights), as volunteers plan from."""
    from transformers import Qwen3MoeConfig

    Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        head_dim=16, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, **kw,
    ).save_pretrained(path)  # fmt: skip
    return path


def test_plan_is_listed_and_prints_a_table_and_a_verdict(tmp_path):
    assert "plan" in run_peer("--help").stdout
    path = _tiny_config(tmp_path / "moe")
    done = run_peer("plan", "--model", str(path), "--gpus", "1MB,1MiB", "--quant", "int8")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("moe (qwen3_moe): 4 layers") and "int8 weights" in lines[0]
    assert lines[2].split()[:4] == ["gpu0", "1.00", "MB", "0:4"]
    assert lines[-1] == "covered: layers 0:4 fit on 1 device"
    short = run_peer("plan", "--model", str(path / "config.json"), "--gpus", "0.3MB", "--json")
    assert short.returncode == 0, short.stderr
    plan = json.loads(short.stdout)
    assert plan["covered"] is False and plan["devices"][0]["memory_bytes"] == 300_000
    assert 0 < plan["left_start"] < 4 and plan["left_memory_bytes"] > plan["left_bytes"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "24GB,16XB"], "peer: error: --gpus entry 2 of 2: '16XB' is not a size such as 24GB"),
        ([], "peer: error: plan needs --gpus"),
        (["--gpus", "8GB", "--dtype", "float64"], "peer: error: dtype 'float64' is not one of"),
    ],
)
def test_plan_refuses_bad_input_in_one_line(tmp_path, args, message):
    done = run_peer("plan", "--model", str(_tiny_config(tmp_path / "moe")), *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr
