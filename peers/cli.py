"""The `peer` command: serve a block of layers, inspect a swarm, run a local swarm, or generate
locally through a chain of blocks."""

import argparse
import json
import logging
import os
import sys
import time

from . import __version__

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    import uvicorn

    from inference.scheduler import SchedulerSettings
    from peers.config import NodeConfig
    from peers.node import PeerNode
    from peers.server import create_app
    from peers.swarm.membership import GossipSettings
    from peers.transport.auth import swarm_key_from
    from peers.transport.limits import guarded_h11

    gossip = GossipSettings(
        interval_s=args.gossip_interval,
        fanout=args.gossip_fanout,
        suspect_after_s=args.suspect_after,
        dead_after_s=args.dead_after,
        tombstone_s=args.tombstone,
    )
    config = NodeConfig(
        model=args.model,
        layers=args.layers,
        num_layers=args.num_layers,
        host=args.host,
        port=args.port,
        public_address=args.public_address,
        join=tuple(args.join or ()),
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        threads=args.threads,
        core_turns=args.core_turns,
        cuda_graphs=args.cuda_graphs,
        max_cache_tokens=args.max_cache_tokens,
        session_idle_s=args.session_idle,
        hop_timeout_s=args.hop_timeout,
        hop_timeout_per_token_s=args.hop_timeout_per_token,
        failover_timeout_s=args.failover_timeout,
        sse_keepalive_s=args.sse_keepalive,
        ban_s=args.ban,
        drain_s=args.drain,
        max_requests=args.max_requests,
        max_body_bytes=args.max_body_bytes,
        read_timeout_s=args.read_timeout,
        header_timeout_s=args.header_timeout,
        max_connections=args.max_connections,
        swarm_key=swarm_key_from(args.swarm_key),
        api_keys=_api_keys(args),
        identity_file=args.identity,
        verify_rate=_verify_rate(args),
        liar_ban_s=args.liar_ban,
        self_referee=args.self_referee,
        prefix_reuse=not args.no_prefix_reuse,
        speculative=not args.no_speculative,
        draft_model=args.draft_model,
        served_model_names=tuple(args.served_model_name or ()),
        allowed_origins=_origins(args.allowed_origins),
        chat_template=_chat_template(args.chat_template),
        direct_return=not args.no_direct_return,
        prefix_cache_tokens=args.prefix_cache_tokens,
        wire=args.wire,
        scheduler=SchedulerSettings(
            max_batch_tokens=args.max_batch_tokens,
            prefill_chunk=args.prefill_chunk,
            max_queue=args.max_step_queue,
            max_queue_wait_s=args.max_queue_wait,
            batch_wait_s=args.batch_wait,
        ),
        rebalance=not args.no_rebalance,
        gossip=gossip,
    )
    if args.host not in LOOPBACK and not config.api_keys:
        logging.getLogger("layerswarm.peer").warning(
            "listening on %s without --api-key: anyone who can reach this port can use the OpenAI API",
            args.host,
        )
    if args.host not in LOOPBACK and config.swarm_key is None:
        logging.getLogger("layerswarm.peer").warning(
            "listening on %s without --swarm-key: any peer that can reach this port may join this swarm",
            args.host,
        )
    if args.host in ("0.0.0.0", "::") and not args.public_address:
        logging.getLogger("layerswarm.peer").warning(
            "listening on %s without --public-address: other peers will be told to dial %s, which only "
            "works on this machine; pass --public-address HOST:PORT",
            args.host,
            config.address,
        )
    sock = _listen(args.host, args.port)  # before anything else: a taken port fails here, in one line
    node = PeerNode(config)  # resolves the model; bad names and layer ranges fail here
    failed = []

    class Server(uvicorn.Server):
        leaving = False

        def handle_exit(self, sig, frame):
            """First signal: leave gracefully (announce, drain while still serving, then stop).
            A second signal stops at once."""
            if self.started and not self.leaving and node.ready:
                self.leaving = True
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.leave_then_exit(sig, frame)))
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

    def on_start_failure(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    app = create_app(node, on_start_failure)
    server = Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=int(config.drain_s) + 1,
            access_log=False,
            http=guarded_h11(config.max_connections, config.header_timeout_s),
        )
    )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(server.serve(sockets=[sock]))
    if failed:
        print(f"peer: error: {failed[0]}", file=sys.stderr)
        return 1
    return 0


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


LOOPBACK = ("127.0.0.1", "::1", "localhost")
OPEN_SWARM_VERIFY_RATE = 0.05  # strangers may join: check one request in 20 (costs under 10%, README)


def _verify_rate(args: argparse.Namespace) -> float:
    """--verify-rate, or by default: checked in an open swarm (strangers may join), not else."""
    from peers.transport.auth import swarm_key_from

    if args.verify_rate is not None:
        return args.verify_rate
    if args.host not in LOOPBACK and swarm_key_from(args.swarm_key) is None:
        return OPEN_SWARM_VERIFY_RATE
    return 0.0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"peer (layerswarm) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter

    serve = sub.add_parser(
        "serve", help="serve a block of layers and the OpenAI API", formatter_class=defaults
    )
    serve.add_argument("--model", default="smollm2-135m", help="built-in name, HF directory or .gguf file")
    serve.add_argument(
        "--layers", default=None, help="layers START:END to serve; default: chosen automatically"
    )
    serve.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="without --layers: how many layers (default: what fits memory)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=7001, help="port to listen on")
    serve.add_argument(
        "--public-address", default=None, help="HOST:PORT other peers dial (default: host:port)"
    )
    serve.add_argument(
        "--join", nargs="+", metavar="HOST:PORT", help="one or more peers of the swarm to join through"
    )
    serve.add_argument("--device", default=None, help="cpu (default) or cuda[:N]")
    serve.add_argument(
        "--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16"
    )
    serve.add_argument("--quant", choices=QUANT_CHOICES, default="none", help=QUANT_HELP)
    serve.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of this peer's forwards (default: OMP_NUM_THREADS, else every core)",
    )
    serve.add_argument(
        "--omp-wait-policy",
        choices=["brief", "passive", "active"],
        default=None,
        help="how idle OpenMP threads wait: brief spins a moment between the operations of a forward, "
        "then sleeps; passive sleeps at once; active spins (default: OMP_WAIT_POLICY if set, else brief, "
        "which leaves the cores to co-located peers between forwards)",
    )
    serve.add_argument(
        "--core-turns",
        choices=["auto", "on", "off"],
        default="auto",
        help="forwards of the peers on this machine take turns, one at a time, so that their threads "
        "never fight for the cores (default auto: on for a CPU peer that shares the machine with other "
        "peers whose threads together outnumber the cores)",
    )
    serve.add_argument(
        "--cuda-graphs",
        choices=["auto", "on", "off"],
        default="auto",
        help="decode steps (one position per session, batches of up to 16) run as CUDA graphs over "
        "static KV slots (default auto: on for a CUDA device, off on a CPU)",
    )
    serve.add_argument("--max-cache-tokens", type=int, default=65536, help="KV cache budget in token slots")
    serve.add_argument(
        "--max-batch-tokens", type=int, default=512, help="positions in one forward (all its steps together)"
    )
    serve.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="a prompt runs in chunks of at most this many positions",
    )
    serve.add_argument(
        "--max-step-queue", type=int, default=1024, help="steps queued here at once; more are answered busy"
    )
    serve.add_argument(
        "--max-queue-wait",
        type=float,
        default=10.0,
        help="seconds a step may wait to start before it is busy",
    )
    serve.add_argument(
        "--batch-wait",
        type=float,
        default=None,
        help="seconds a forward may wait for sessions that are mid-round on other peers, never when idle "
        "(default: while other peers share this machine's cores, until each is due back, so that waves "
        "merge; else 0)",
    )
    serve.add_argument(
        "--no-prefix-reuse", action="store_true", help="never reuse the KV of prompt prefixes computed before"
    )
    serve.add_argument(
        "--wire",
        choices=["lossless", "bf16", "fp16", "int8"],
        default="lossless",
        help="how this peer's hidden states travel to next peers that accept it: lossless (exact), "
        "bf16, fp16, or int8 (absmax per 64 values, each row's 8 largest apart; the sampled positions, "
        "and under int8 a sequence's first and the 16 before the sampled ones, as float16); a peer "
        "that chose a compressed wire accepts any, one left lossless only lossless",
    )
    serve.add_argument(
        "--no-direct-return",
        action="store_true",
        help="results of steps entering here come back through every hop of the route, not straight "
        "from the last peer",
    )
    serve.add_argument(
        "--draft-model",
        default=None,
        help="a small model sharing the served model's tokenizer (a name or a folder), run by this peer "
        "to draft tokens for requests entering here where prompt lookup finds none",
    )
    serve.add_argument(
        "--no-speculative",
        action="store_true",
        help="requests entering here never draft tokens for the chain to check (speculative decoding)",
    )
    serve.add_argument(
        "--prefix-cache-tokens", type=int, default=16384, help="KV token slots kept for prefix reuse"
    )
    serve.add_argument(
        "--session-idle", type=float, default=120.0, help="seconds before an idle session is freed"
    )
    serve.add_argument(
        "--hop-timeout", type=float, default=30.0, help="seconds one hop of a step may take, plus the next"
    )
    serve.add_argument(
        "--hop-timeout-per-token",
        type=float,
        default=0.02,
        help="extra seconds a hop may take per position it carries (a long prefill is not a dead peer)",
    )
    serve.add_argument(
        "--failover-timeout", type=float, default=60.0, help="seconds an entry keeps re-routing a request"
    )
    serve.add_argument(
        "--sse-keepalive",
        type=float,
        default=5.0,
        help="seconds without an event after which a stream sends a keep-alive comment (e.g. during a failover)",
    )
    serve.add_argument(
        "--ban", type=float, default=5.0, help="seconds a failed peer is first avoided (doubles on repeats)"
    )
    serve.add_argument(
        "--verify-rate",
        type=float,
        default=None,
        help="share of requests (0 to 1) this entry checks: at each step, every hop that has another "
        "replica is recomputed by it on the same input, hops commit to their outputs, and a referee "
        f"route decides a disagreement (default {OPEN_SWARM_VERIFY_RATE} in an open swarm, listening "
        "beyond loopback without --swarm-key; else 0)",
    )
    serve.add_argument(
        "--self-referee",
        action="store_true",
        help="when a hop and its only other replica disagree, this entry recomputes the disputed "
        "layers itself (loading layers 0 to the disputed boundary) instead of failing the request",
    )
    serve.add_argument(
        "--liar-ban",
        type=float,
        default=3600.0,
        help="seconds a peer convicted of computing wrong is avoided, whatever life it starts",
    )
    serve.add_argument("--drain", type=float, default=10.0, help="seconds in-flight requests get on shutdown")
    serve.add_argument(
        "--max-requests", type=int, default=64, help="requests this entry serves at once; more get 429"
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 << 20,
        help="the largest request body (OpenAI requests, gossip) in bytes; more get 413 (step frames "
        "may carry the hidden states of a whole context)",
    )
    serve.add_argument(
        "--read-timeout", type=float, default=10.0, help="seconds a request body may pause; then 408"
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a connection may take to send a request's headers; then it is closed",
    )
    serve.add_argument(
        "--swarm-key",
        default=None,
        help="a private swarm's shared key (16+ characters; default: LAYERSWARM_SWARM_KEY): every "
        "peer-to-peer request is signed with it, and unsigned ones get 401",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="a key the OpenAI API takes as 'Authorization: Bearer KEY' (repeatable; default: any caller)",
    )
    serve.add_argument("--api-key-file", default=None, help="a file of API keys, one per line")
    serve.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the model names the OpenAI API answers to; responses and /v1/models report the first "
        "(default: the model's id)",
    )
    serve.add_argument(
        "--chat-template",
        default=None,
        metavar="TEMPLATE",
        help="a Jinja chat template in place of the model's: a file, or the template's text itself",
    )
    serve.add_argument(
        "--allowed-origins",
        default=None,
        metavar="ORIGIN[,ORIGIN...]",
        help="browser origins (SCHEME://HOST[:PORT], or *) that may call this peer's API (CORS); "
        "default: none, no CORS headers",
    )
    serve.add_argument(
        "--identity",
        default=None,
        metavar="FILE",
        help="this peer's Ed25519 key (PEM), created on first start; its peer id derives from it "
        "(default: a new identity each start)",
    )
    serve.add_argument(
        "--max-connections", type=int, default=2048, help="open HTTP connections; more are closed at once"
    )
    serve.add_argument(
        "--no-rebalance",
        action="store_true",
        help="without --layers: keep the chosen span even when a gap opens",
    )
    serve.add_argument("--gossip-interval", type=float, default=1.0, help="seconds between gossip rounds")
    serve.add_argument("--gossip-fanout", type=int, default=3, help="peers contacted each round")
    serve.add_argument(
        "--suspect-after", type=float, default=4.0, help="seconds of silence before a peer is suspect"
    )
    serve.add_argument(
        "--dead-after", type=float, default=8.0, help="seconds of silence before a peer is dead"
    )
    serve.add_argument(
        "--tombstone", type=float, default=60.0, help="seconds a dead peer's tombstone is kept"
    )
    serve.add_argument("--log-level", default="warning", help="uvicorn's log level")
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text lines, or one JSON object per line (time, level, logger, message, request_id)",
    )
    serve.set_defaults(run=_serve)

    status = sub.add_parser("status", help="print the swarm as one peer sees it", formatter_class=defaults)
    status.add_argument("--peer", default="127.0.0.1:7001", help="HOST:PORT of any peer")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the peer")
    status.add_argument(
        "--swarm-key", default=None, help="the key of a private swarm (default: LAYERSWARM_SWARM_KEY)"
    )
    status.add_argument(
        "--json", action="store_true", help="print the table as JSON (as /swarm/table gives it)"
    )
    status.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (2 if not given) until Ctrl-C",
    )
    status.set_defaults(run=_status)

    swarm = sub.add_parser("swarm", help="run a local swarm from a TOML config", formatter_class=defaults)
    swarm.add_argument(
        "--config",
        default="configs/local-smollm2.toml",
        help="the swarm's TOML preset: a file, or the name of an installed one (local-smollm2, llama-8b-example)",
    )
    swarm.add_argument("--model", default=None, help="override the config's model")
    swarm.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the model names every peer's OpenAI API answers to (as peer serve's)",
    )
    swarm.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default=None,
        help="every peer's weights (default: the config's, else none)",
    )
    swarm.set_defaults(run=_swarm)

    gen = sub.add_parser(
        "generate", help="generate locally through a chain of blocks", formatter_class=defaults
    )
    gen.add_argument("prompt", help="the user message (sent through the chat template)")
    gen.add_argument("--model", default="smollm2-135m", help="built-in name, HF directory or .gguf file")
    gen.add_argument("--split", default="0:10,10:20,20:30", help="comma-separated layer spans, in order")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None, help="cpu (default) or cuda[:N]")
    gen.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    gen.add_argument("--quant", choices=QUANT_CHOICES, default="none", help=QUANT_HELP)
    gen.set_defaults(run=_generate)
    return parser


QUANT_CHOICES = ("none", "int8", "int4")  # inference.quant.QUANT_MODES, without importing torch here
QUANT_HELP = (
    "weight-only quantization of this peer's layers: none; int8 (integers per group of 32 weights, "
    "about 0.31x the float32 bytes; exact on weights from a Q8_0/Q4_x GGUF such as the default model's); "
    "int4 (torchao's int4 tinygemm, bfloat16 compute, about 0.16-0.19x)"
)
BRIEF_SPINS = 300000  # GOMP_SPINCOUNT of the brief policy: a few milliseconds at most


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """--api-key values and the lines of --api-key-file (blank lines and # comments skipped)."""
    keys = list(args.api_key or ())
    if args.api_key_file:
        with open(args.api_key_file) as f:
            keys += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    for key in keys:
        if len(key) < 8 or not key.isprintable() or " " in key:
            raise ValueError("an API key has at least 8 printable characters and no spaces")
    return tuple(keys)


def _origins(value: str | None) -> tuple[str, ...]:
    """--allowed-origins: a comma-separated list."""
    return tuple(o.strip() for o in (value or "").split(",") if o.strip())


def _chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the argument itself if it is a template (it holds "{%"
    or "{{"); checked to compile here, before the model loads."""
    from pathlib import Path

    from inference.tokenizer import check_chat_template

    if value is None:
        return None
    try:
        is_file = Path(value).is_file()
    except (OSError, ValueError):  # a template's text may be too long, or odd, for a file name
        is_file = False
    if is_file:
        text = Path(value).read_text()
    elif "{%" in value or "{{" in value:
        text = value
    else:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a template's text")
    try:
        check_chat_template(text)
    except ValueError as e:
        raise ValueError(f"--chat-template {value if is_file else '(the text given)'}: {e}") from None
    return text


def _set_wait_policy(policy: str | None) -> None:
    """Passive OpenMP threads sleep after every parallel region, and waking them costs tens of
    microseconds on a VM, once per operation of a forward; active ones spin between forwards
    too, taking the cores from co-located peers. Brief: spin a moment, then sleep (libgomp's
    GOMP_SPINCOUNT; an explicit one wins). Three peers on 2 cores, 8 streams, side by side: a
    forward of 10 layers took 28 ms brief against 34 ms passive (medians of 3 runs each)."""
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
    if args.command == "serve":  # read by OpenMP when torch loads: set it first
        _set_wait_policy(args.omp_wait_policy)
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
