"""The `peer` command: serve a block of layers, inspect a swarm, run a local swarm, generate
locally through a chain of blocks, or plan how a model's layers split over a group of devices."""

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace

from . import __version__
from .config import NodeConfig
from .cores import parse_cpus, pin_cpus
from .option_values import LOOPBACK
from .options import Flag, add_flags, config_flag, config_flags, read_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BRIEF_SPINS = 300000  # GOMP_SPINCOUNT of the brief policy: a few milliseconds at most

# serve's flags that set up the process rather than the peer (NodeConfig declares the others)
OMP_FLAG = Flag(
    "--omp-wait-policy",
    "how idle OpenMP threads wait: brief spins a moment between the operations of a forward, "
    "then sleeps; passive sleeps at once; active spins (default: OMP_WAIT_POLICY if set, else brief, "
    "which leaves the cores to co-located peers between forwards)",
    None,
    choices=("brief", "passive", "active"),
)
LOG_FLAGS = (
    Flag("--log-level", "uvicorn's log level", "warning"),
    Flag(
        "--log-format",
        "text lines, or one JSON object per line (time, level, logger, message, request_id)",
        "text",
        choices=("text", "json"),
    ),
)
STATUS_FLAGS = (
    Flag("--peer", "HOST:PORT of any peer", "127.0.0.1:7001"),
    Flag("--timeout", "seconds to wait for the peer", 5.0, float),
    Flag("--swarm-key", "the key of a private swarm (default: LAYERSWARM_SWARM_KEY)", None),
    Flag("--json", "print the table as JSON (as /swarm/table gives it)", action="store_true"),
    Flag(
        "--watch",
        "refresh every SECONDS (2 if not given) until Ctrl-C",
        None,
        float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
    ),
)
SWARM_FLAGS = (
    Flag(
        "--config",
        "the swarm's TOML preset: a file, or the name of an installed one (local-smollm2, llama-8b-example)",
        "configs/local-smollm2.toml",
    ),
    replace(config_flag(NodeConfig, "--model"), help="override the config's model", default=None),
    replace(
        config_flag(NodeConfig, "--served-model-name"),
        help="the model names every peer's OpenAI API answers to (as peer serve's)",
    ),
    replace(
        config_flag(NodeConfig, "--quant"),
        help="every peer's weights (default: the config's, else none)",
        default=None,
    ),
)
GENERATE_FLAGS = (
    Flag("prompt", "the user message (sent through the chat template)"),
    config_flag(NodeConfig, "--model"),
    Flag("--split", "comma-separated layer spans, in order", "0:10,10:20,20:30"),
    Flag("--max-tokens", None, 64, int),
    Flag("--temperature", "0 = greedy", 0.0, float),
    Flag("--seed", None, None, int),
    config_flag(NodeConfig, "--device"),
    config_flag(NodeConfig, "--dtype"),
    config_flag(NodeConfig, "--quant"),
)
PLAN_FLAGS = (
    replace(
        config_flag(NodeConfig, "--model"),
        help="what peer serve --model takes, or a config.json (a file, or a directory holding only it)",
    ),
    Flag(
        "--gpus",
        "required: each device's memory, comma-separated, in GB, GiB or MB (e.g. 24GB,24GB,16GB)",
        None,
    ),
    replace(
        config_flag(NodeConfig, "--quant"), help="weight-only quantization of the layers, as peer serve's"
    ),
    replace(
        config_flag(NodeConfig, "--dtype"),
        help="the dtype of weights left unquantized (a CUDA peer's)",
        default="bfloat16",
    ),
    Flag(
        "--reserve-gb",
        "GB of each device kept for the KV cache and activations; if not given, 10%% of its memory",
        None,
        float,
    ),
    Flag("--json", "print the plan as JSON", action="store_true"),
)


def _serve(args: argparse.Namespace) -> int:
    from peers.node import PeerNode

    config = NodeConfig(**read_config(NodeConfig, args))
    _warn_if_exposed(config)
    sock = _listen(config.host, config.port)  # before anything else: a taken port fails here, in one line
    node = PeerNode(config)  # resolves the model; bad names and layer ranges fail here
    return _run(node, config, sock, args.log_level)


def _warn_if_exposed(config: NodeConfig) -> None:
    """Listening beyond loopback: say what is open to anyone who can reach the port."""
    log = logging.getLogger("layerswarm.peer")
    if config.host not in LOOPBACK and not config.api_keys:
        log.warning(
            "listening on %s without --api-key: anyone who can reach this port can use the OpenAI API",
            config.host,
        )
    if config.host not in LOOPBACK and config.swarm_key is None:
        log.warning(
            "listening on %s without --swarm-key: any peer that can reach this port may join this swarm",
            config.host,
        )
    if config.host in ("0.0.0.0", "::") and not config.public_address:
        log.warning(
            "listening on %s without --public-address: other peers will be told to dial %s, which only "
            "works on this machine; pass --public-address HOST:PORT",
            config.host,
            config.address,
        )


def _run(node, config: NodeConfig, sock, log_level: str) -> int:
    """Serve the node's app on the listening socket until a stop signal; 1 if its start failed."""
    import asyncio

    import uvicorn

    from peers.server import create_app
    from peers.transport.limits import guarded_h11

    failed = []

    def on_start_failure(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    app = create_app(node, on_start_failure)
    server = _leaving_server(
        node,
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            timeout_graceful_shutdown=int(config.drain_s) + 1,
            access_log=False,
            http=guarded_h11(config.max_connections, config.header_timeout_s),
            ws_max_size=node.max_steps_body_bytes + (64 << 10),  # (a steps stream's message: its header too)
            ws_ping_interval=None,
        ),
    )
    server.loop = asyncio.new_event_loop()
    asyncio.set_event_loop(server.loop)
    server.loop.run_until_complete(server.serve(sockets=[sock]))
    if failed:
        print(f"peer: error: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def _leaving_server(node, config):
    """A uvicorn server whose first stop signal makes the node leave gracefully (announce, drain
    while still serving, then stop); a second signal stops at once."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        leaving = False
        loop: asyncio.AbstractEventLoop

        def handle_exit(self, sig, frame):
            if self.started and not self.leaving and node.ready:
                self.leaving = True
                self.loop.call_soon_threadsafe(
                    lambda: asyncio.ensure_future(self.leave_then_exit(sig, frame))
                )
                return
            if self.leaving:  # (uvicorn would still wait up to its graceful timeout for connections)
                self.force_exit = True
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a graceful stop is a normal exit, not death by signal

        async def leave_then_exit(self, sig, frame):
            try:
                await node.leave()
            finally:
                super().handle_exit(sig, frame)
                self._captured_signals.clear()

    return Server(config)


def _listen(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: the connections accepted inherit it, and asyncio sets TCP_NODELAY
    # only on sockets that name it. Without, a reply's body waits behind its headers for the
    # client's delayed ACK (Nagle): ~40 ms per hop.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _status(args: argparse.Namespace) -> int:
    from peers.sdk import fetch_table, format_table
    from peers.transport.auth import swarm_key_from

    key = swarm_key_from(args.swarm_key)
    if args.watch is not None and args.watch <= 0:
        raise ValueError(f"--watch takes a positive number of seconds, got {args.watch}")
    while True:
        table = fetch_table(args.peer, timeout_s=args.timeout, swarm_key=key)
        text = json.dumps(table, indent=2) if args.json else format_table(table)
        if args.watch is None:
            print(text)
            return 0
        # clear the terminal, then the table and when it was read
        print(
            "\033[H\033[2J"
            + text
            + f"\n\n{time.strftime('%H:%M:%S')}, every {args.watch:g} s (Ctrl-C stops)",
            flush=True,
        )
        time.sleep(args.watch)


def _swarm(args: argparse.Namespace) -> int:
    from peers.local_swarm import run_local_swarm

    return run_local_swarm(args.config, args.model, args.served_model_name, args.quant)


def _generate(args: argparse.Namespace) -> int:
    from inference import LocalChain, SamplingParams, Tokenizer, generate, load_block, resolve_model

    source = resolve_model(args.model)
    tokenizer = Tokenizer(source.path)
    spans = args.split.split(",")
    blocks = [load_block(source.path, span, args.device, args.dtype, quant=args.quant) for span in spans]
    chain = LocalChain(blocks)
    prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    params = SamplingParams(temperature=args.temperature, seed=args.seed)
    tokens = list(generate(chain, prompt, args.max_tokens, params, tokenizer.eos_token_ids))
    print(tokenizer.decode(tokens))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from peers.swarm.plan import format_plan, make_plan, plan_json

    if args.gpus is None:
        raise ValueError("plan needs --gpus, each device's memory: e.g. --gpus 24GB,24GB,16GB")
    plan = make_plan(args.model, args.gpus, args.quant, args.dtype, args.reserve_gb)
    print(plan_json(plan) if args.json else format_plan(plan))
    return 0


def _serve_flags() -> list[Flag]:
    """NodeConfig's flags with the process's own: --omp-wait-policy beside --threads, logging last."""
    flags = config_flags(NodeConfig)
    at = [flag.name for flag in flags].index("--threads") + 1
    return [*flags[:at], OMP_FLAG, *flags[at:], *LOG_FLAGS]


def build_parser() -> argparse.ArgumentParser:
    """The `peer` parser, generated from the declared flags (serve's from NodeConfig's fields)."""
    parser = argparse.ArgumentParser(prog="peer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"peer (layerswarm) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        (
            "serve",
            "serve a block of layers and the OpenAI API",
            _serve_flags(),
            _serve,
        ),
        ("status", "print the swarm as one peer sees it", STATUS_FLAGS, _status),
        ("swarm", "run a local swarm from a TOML config", SWARM_FLAGS, _swarm),
        ("generate", "generate locally through a chain of blocks", GENERATE_FLAGS, _generate),
        ("plan", "how a model's layers would split over devices of given memory", PLAN_FLAGS, _plan),
    )
    for name, help, flags, run in commands:
        command = sub.add_parser(name, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_flags(command, flags)
        command.set_defaults(run=run)
    return parser


def _set_wait_policy(policy: str | None) -> None:
    """Passive OpenMP threads sleep after every parallel region, and waking them costs tens of
    microseconds on a VM, once per operation of a forward; active ones spin between forwards
    too, taking the cores from co-located peers. Brief: spin a moment, then sleep (libgomp's
    GOMP_SPINCOUNT; an explicit one wins). README, "CPU threads", compares the three."""
    if policy is None and "OMP_WAIT_POLICY" in os.environ:
        return  # the environment's
    policy = policy or "brief"
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE" if policy == "active" else "PASSIVE"
    if policy == "brief":
        os.environ.setdefault("GOMP_SPINCOUNT", str(BRIEF_SPINS))
    elif policy == "passive":
        os.environ.pop("GOMP_SPINCOUNT", None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":  # read by OpenMP when torch loads, and inherited by its threads: first
        _set_wait_policy(args.omp_wait_policy)
        try:
            pin_cpus(parse_cpus(args.cpus))
        except ValueError as e:
            print(f"peer: error: {e}", file=sys.stderr)
            return 2
    from inference import InferenceError
    from peers.sdk import SwarmAPIError
    from peers.transport.logs import setup_logging

    setup_logging(getattr(args, "log_format", "text"), logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.run(args)
    except (InferenceError, ValueError, SwarmAPIError, OSError) as e:
        print(f"peer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
