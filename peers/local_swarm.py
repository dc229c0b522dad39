"""`peer swarm`: start the peers of a TOML preset on this machine, wait for a complete route,
print how to use it, and stop every peer on Ctrl-C."""

import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

import httpx

from peers.cores import format_cpus, split_cpus, usable_cpus

START_TIMEOUT_S = 600.0


def serve_command(
    model: str,
    port: int,
    layers: str | None = None,
    join: list[str] = (),
    host: str = "127.0.0.1",
    args: list[str] = (),
) -> list[str]:
    """The `peer serve` command line of one peer, run with this Python."""
    cmd = [
        sys.executable,
        "-m",
        "peers.cli",
        "serve",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if layers:
        cmd += ["--layers", layers]
    if join:
        cmd += ["--join", *join]
    return cmd + [str(a) for a in args]


def read_preset(config: str) -> str:
    """A swarm preset's TOML: the file at `config`, else the installed preset of that name
    (configs/ ships in the package: `local-smollm2`, `local-smollm2.toml` and
    `configs/local-smollm2.toml` all name it, from any directory)."""
    path = Path(config)
    if path.is_file():
        return path.read_text()
    from importlib.resources import files

    presets = files("layerswarm_configs")
    name = path.name if path.suffix == ".toml" else f"{path.name}.toml"
    preset = presets.joinpath(name)
    if preset.is_file():
        return preset.read_text()
    known = sorted(p.name.removesuffix(".toml") for p in presets.iterdir() if p.name.endswith(".toml"))
    raise ValueError(
        f"no swarm preset {config!r}: not a file, nor one of the installed presets {', '.join(known)}"
    )


def core_layout(peers: int, cpus: Sequence[int], named: bool = False) -> tuple[list[list[str]], str]:
    """Each peer's --cpus flags and a sentence saying how the peers use this machine's cores:
    disjoint cores where there are at least as many as peers (an even split), else shared cores
    with core turns; `named`: the preset names the peers' cores itself (kept as it says)."""
    if named:
        return [[] for _ in range(peers)], "cores as the config names them (--cpus)"
    split = split_cpus(peers, cpus)
    if split is None:
        return [[] for _ in range(peers)], (
            f"{peers} peers share {len(cpus)} cores ({format_cpus(cpus)}): their forwards take turns on them"
        )
    each = ", ".join(format_cpus(own) for own in split)
    return [["--cpus", format_cpus(own)] for own in split], f"each peer on cores of its own: {each}"


def run_local_swarm(
    config_path: str,
    model_override: str | None = None,
    served_names: list[str] | None = None,
    quant: str | None = None,
) -> int:
    """Start the preset's peers; `quant` (none, int8, int4) overrides the preset's `quant` (top
    level or per peer) for every peer."""
    preset = tomllib.loads(read_preset(config_path))
    model, host = model_override or preset["model"], preset.get("host", "127.0.0.1")
    peers = preset.get("peers") or []
    if not peers:
        raise ValueError(f"{config_path} lists no [[peers]]")
    from inference import resolve_model

    resolve_model(model)  # fetch and convert once, before the peers start
    first = f"{host}:{peers[0]['port']}"
    named = any("--cpus" in peer.get("args", []) for peer in peers)
    pins, layout = core_layout(len(peers), usable_cpus(), named)
    print(f"peer swarm: {layout}", file=sys.stderr, flush=True)
    procs = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that `finally` stops the peers
    for i, peer in enumerate(peers):
        device = peer.get("device", preset.get("device"))
        extra = ["--device", device] if device else []
        peer_quant = quant or peer.get("quant", preset.get("quant"))
        extra += ["--quant", peer_quant] if peer_quant else []
        extra += ["--served-model-name", *served_names] if served_names else []
        extra += pins[i]
        join = [first] if i else []
        cmd = serve_command(model, peer["port"], peer.get("layers"), join, host, extra + peer.get("args", []))
        procs.append(subprocess.Popen(cmd, start_new_session=True))
    try:
        if not _wait_for_route(first, procs):
            return 1
        served = httpx.get(f"http://{first}/v1/models", timeout=5).json()["data"][0]["id"]
        _print_usage(first, served)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("peer swarm: a peer exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\npeer swarm: stopping", file=sys.stderr)
        return 0
    finally:
        stop_all(procs)


def _wait_for_route(entry: str, procs: list[subprocess.Popen]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            print("peer swarm: a peer failed to start", file=sys.stderr)
            return False
        try:
            table = httpx.get(f"http://{entry}/swarm/table", timeout=2).json()
            if not table["gaps"] and httpx.get(f"http://{entry}/health", timeout=2).status_code == 200:
                return True
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    print(f"peer swarm: no complete route after {START_TIMEOUT_S:.0f} s", file=sys.stderr)
    return False


def _print_usage(entry: str, model: str) -> None:
    print(
        f"""
LayerSwarm is serving {model} at http://{entry}/v1 (any peer is an entry). Try:

  curl http://{entry}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="http://{entry}/v1", api_key="-"); \\
print(c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)'

  peer status --peer {entry}

Ctrl-C stops every peer.""",
        flush=True,
    )


def stop_all(procs: list[subprocess.Popen], timeout_s: float = 20.0) -> None:
    """SIGTERM every peer (they leave gracefully), then SIGKILL whoever is still there. Another
    Ctrl-C or SIGTERM meanwhile kills them at once instead of leaving them behind."""

    def signal_all(sig: int) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: signal_all(signal.SIGKILL))
    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_all(signal.SIGKILL)
            p.wait()
