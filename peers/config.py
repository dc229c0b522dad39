"""A peer's options, each declared once (its field, flag, default, help and check): the frozen
settings `peer serve` builds, and the flags its parser is generated from (peers/options.py)."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from peers.cores import check_cpus, format_cpus, parse_cpus
from peers.option_values import (
    OPEN_SWARM_VERIFY_RATE,
    check_key,
    check_origins,
    check_port,
    check_served_names,
    check_share,
    on_off,
    read_api_keys,
    read_chat_template,
    read_origins,
    read_swarm_key,
    read_verify_rate,
)
from peers.options import Flag, at_least, check_fields, one_of, option, positive, settings
from peers.swarm.membership import GossipSettings
from peers.transport.limits import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_READ_TIMEOUT_S,
)

if TYPE_CHECKING:
    from inference.scheduler import SchedulerSettings

# The engine's names and the scheduler's defaults (SCHEDULER_FLAGS) are written here too, so that
# the parser never imports torch; tests/test_cli.py checks that they agree with inference's.
DEFAULT_MODEL = "smollm2-135m"
QUANT_CHOICES = ("none", "int8", "int4")
WIRE_CHOICES = ("lossless", "bf16", "fp16", "int8")
GOSSIP_DEFAULTS = GossipSettings()

MAX_CACHE_TOKENS = 65536  # the KV cache budget's default, in token slots
CORE_TURNS = ("auto", "on", "off")
CUDA_GRAPHS = {"auto": None, "on": True, "off": False}  # --cuda-graphs -> load_block's cuda_graphs
QUANT_HELP = (
    "weight-only quantization of this peer's layers: none; int8 (integers per group of 32 weights, "
    "about 0.31x the float32 bytes; exact on weights from a Q8_0/Q4_x GGUF such as the default model's); "
    "int4 (torchao's int4 tinygemm, bfloat16 compute, about 0.16-0.19x)"
)


def scheduler_settings(**values: object) -> "SchedulerSettings":
    """The engine's scheduler settings (imported here, late: it loads torch)."""
    from inference.scheduler import SchedulerSettings

    return SchedulerSettings(**values)


SCHEDULER_FLAGS = {
    "max_batch_tokens": Flag(
        "--max-batch-tokens", "positions in one forward (all its steps together)", 512, int
    ),
    "prefill_chunk": Flag(
        "--prefill-chunk", "a prompt runs in chunks of at most this many positions", 256, int
    ),
    "max_queue": Flag("--max-step-queue", "steps queued here at once; more are answered busy", 1024, int),
    "max_queue_wait_s": Flag(
        "--max-queue-wait", "seconds a step may wait to start before it is busy", 10.0, float
    ),
    "batch_wait_s": Flag(
        "--batch-wait",
        "seconds a forward may wait for sessions that are mid-round on other peers, never when idle "
        "(default: while other peers share this machine's cores, until each is due back, so that waves "
        "merge; else 0)",
        None,
        float,
    ),
    "micro_batches": Flag(
        "--micro-batches",
        "on: a peer with cores (or a GPU) of its own takes at most 1/stages of the sessions' decode "
        "steps a forward, so that a pipeline's stages compute at once (pipelined micro-batches); "
        "off: every queued decode step runs in the next forward",
        True,
        on_off,
        metavar="on|off",
    ),
}
GOSSIP_FLAGS = {
    "interval_s": Flag(
        "--gossip-interval", "seconds between gossip rounds", GOSSIP_DEFAULTS.interval_s, float
    ),
    "fanout": Flag("--gossip-fanout", "peers contacted each round", GOSSIP_DEFAULTS.fanout, int),
    "suspect_after_s": Flag(
        "--suspect-after",
        "seconds of silence before a peer is suspect",
        GOSSIP_DEFAULTS.suspect_after_s,
        float,
    ),
    "dead_after_s": Flag(
        "--dead-after", "seconds of silence before a peer is dead", GOSSIP_DEFAULTS.dead_after_s, float
    ),
    "tombstone_s": Flag(
        "--tombstone", "seconds a dead peer's tombstone is kept", GOSSIP_DEFAULTS.tombstone_s, float
    ),
}


@dataclass(frozen=True)
class NodeConfig:
    """A peer's settings; each field declares its `peer serve` flag, default, help and check."""

    model: str = option(DEFAULT_MODEL, Flag("--model", "built-in name, HF directory or .gguf file"))
    layers: str | None = option(
        None, Flag("--layers", "layers START:END to serve; default: chosen automatically")
    )
    num_layers: int | None = option(
        None,
        Flag("--num-layers", "without --layers: how many layers (default: what fits memory)"),
        check=at_least(1),
    )
    host: str = option("127.0.0.1", Flag("--host", "address to listen on"))
    port: int = option(7001, Flag("--port", "port to listen on"), check=check_port)
    public_address: str | None = option(  # what others dial; host:port by default
        None, Flag("--public-address", "HOST:PORT other peers dial (default: host:port)")
    )
    join: tuple[str, ...] = option(
        (), Flag("--join", "one or more peers of the swarm to join through", nargs="+", metavar="HOST:PORT")
    )
    device: str | None = option(None, Flag("--device", "cpu (default) or cuda[:N]"))
    dtype: str | None = option(
        None, Flag("--dtype", "float32 (CPU default), bfloat16 (CUDA default), float16")
    )
    quant: str = option(  # this peer's weights, weight-only (inference/quant.py)
        "none", Flag("--quant", QUANT_HELP, choices=QUANT_CHOICES), check=one_of(QUANT_CHOICES)
    )
    cpus: tuple[int, ...] = option(  # () = every core this process may use (peers/cores.py)
        (),
        Flag(
            "--cpus",
            "the CPU cores this peer runs on, e.g. 0, 0,1 or 2-3 (its whole process is pinned to them); "
            "its forwards then use that many threads and take no turns with other peers (default: every core)",
            default=None,
            type=str,
            metavar="LIST",
        ),
        check=check_cpus,
        read=lambda args: parse_cpus(args.cpus),
    )
    threads: int | None = option(  # torch threads; None: --cpus' count, else OMP_NUM_THREADS, else every core
        None,
        Flag(
            "--threads",
            "torch threads of this peer's forwards (default: as many as --cpus names, else OMP_NUM_THREADS, "
            "else every core)",
        ),
        check=at_least(1),
    )
    core_turns: str = option(
        "auto",
        Flag(
            "--core-turns",
            "forwards of the peers on this machine take turns, one at a time, on the cores they share, so "
            "that their threads never fight for them (default auto: on for a CPU peer without --cpus that "
            "shares the machine with other peers whose threads together outnumber the cores)",
            choices=CORE_TURNS,
        ),
        check=one_of(CORE_TURNS),
    )
    cuda_graphs: str = option(
        "auto",
        Flag(
            "--cuda-graphs",
            "decode steps (one position per session, batches of up to 16) run as CUDA graphs over "
            "static KV slots (default auto: on for a CUDA device, off on a CPU)",
            choices=tuple(CUDA_GRAPHS),
        ),
        check=one_of(tuple(CUDA_GRAPHS)),
    )
    max_cache_tokens: int = option(
        MAX_CACHE_TOKENS, Flag("--max-cache-tokens", "KV cache budget in token slots")
    )
    scheduler: "SchedulerSettings" = settings(scheduler_settings, SCHEDULER_FLAGS)
    prefix_reuse: bool = option(
        True, Flag("--no-prefix-reuse", "never reuse the KV of prompt prefixes computed before")
    )
    generation_config: str = option(
        "auto",
        Flag(
            "--generation-config",
            "auto: a request that names no temperature, top_p, top_k, min_p or repetition_penalty gets "
            "the model's (its generation_config.json, else a built-in model's card); none: OpenAI's",
            choices=("auto", "none"),
        ),
        check=one_of(("auto", "none")),
    )
    hop_stream: bool = option(
        True,
        Flag(
            "--no-hop-stream",
            "send steps to next peers as one HTTP request a message, not over one persistent "
            "websocket per next peer (the lean hop; a peer that takes none is sent to by HTTP anyway)",
        ),
    )
    wire: str = option(  # how hidden states travel to next hops that accept it (peers/transport/wire.py)
        WIRE_CHOICES[0],
        Flag(
            "--wire",
            "how this peer's hidden states travel to next peers that accept it: lossless (exact), "
            "bf16, fp16, or int8 (absmax per 64 values, each row's 8 largest apart; the sampled positions, "
            "and under int8 a sequence's first and the 16 before the sampled ones, as float16); a peer "
            "that chose a compressed wire accepts any, one left lossless only lossless",
            choices=WIRE_CHOICES,
        ),
        check=one_of(WIRE_CHOICES),
    )
    direct_return: bool = option(
        True,
        Flag(
            "--no-direct-return",
            "results of steps entering here come back through every hop of the route, not straight "
            "from the last peer",
        ),
    )
    draft_model: str | None = option(
        None,
        Flag(
            "--draft-model",
            "a small model sharing the served model's tokenizer (a name or a folder), run by this peer "
            "to draft tokens for requests entering here where prompt lookup finds none",
        ),
    )
    speculative: bool = option(  # (peers/entry/speculative.py)
        True,
        Flag(
            "--no-speculative",
            "requests entering here never draft tokens for the chain to check (speculative decoding)",
        ),
    )
    prefix_cache_tokens: int = option(
        16384, Flag("--prefix-cache-tokens", "KV token slots kept for prefix reuse"), check=at_least(0)
    )
    session_idle_s: float = option(
        120.0, Flag("--session-idle", "seconds before an idle session is freed"), check=positive
    )
    hop_timeout_s: float = option(  # a hop's deadline: this, plus hop_timeout_per_token_s per position
        30.0, Flag("--hop-timeout", "seconds one hop of a step may take, plus the next"), check=positive
    )
    hop_timeout_per_token_s: float = option(
        0.02,
        Flag(
            "--hop-timeout-per-token",
            "extra seconds a hop may take per position it carries (a long prefill is not a dead peer)",
        ),
        check=at_least(0),
    )
    failover_timeout_s: float = option(
        60.0, Flag("--failover-timeout", "seconds an entry keeps re-routing a request"), check=positive
    )
    sse_keepalive_s: float = option(
        5.0,
        Flag(
            "--sse-keepalive",
            "seconds without an event after which a stream sends a keep-alive comment (e.g. during a failover)",
        ),
        check=positive,
    )
    ban_s: float = option(  # doubles on each repeat, up to ban_max_s
        5.0, Flag("--ban", "seconds a failed peer is first avoided (doubles on repeats)"), check=positive
    )
    ban_max_s: float = 120.0
    verify_rate: float = option(  # (peers/entry/consensus.py)
        0.0,
        Flag(
            "--verify-rate",
            "share of the hops of each request (0 to 1) this entry checks: each hop that has another "
            "replica is drawn on its own, and a drawn hop is recomputed by that replica at every step "
            "on the same input; hops commit to their outputs, and a referee route decides a disagreement "
            f"(default {OPEN_SWARM_VERIFY_RATE} in an open swarm, listening "
            "beyond loopback without --swarm-key; else 0)",
            default=None,
        ),
        check=check_share,
        read=read_verify_rate,
    )
    self_referee: bool = option(
        False,
        Flag(
            "--self-referee",
            "when a hop and its only other replica disagree, this entry recomputes the disputed "
            "layers itself (loading layers 0 to the disputed boundary) instead of failing the request",
        ),
    )
    liar_ban_s: float = option(
        3600.0,
        Flag("--liar-ban", "seconds a peer convicted of computing wrong is avoided, whatever life it starts"),
        check=positive,
    )
    drain_s: float = option(10.0, Flag("--drain", "seconds in-flight requests get on shutdown"))
    max_requests: int = option(
        64,
        Flag("--max-requests", "requests this entry runs at once; more wait in its queue (--max-waiting)"),
        check=at_least(1),
    )
    max_waiting: int = option(
        256,
        Flag(
            "--max-waiting",
            "requests that may wait in this entry's queue beyond --max-requests running ones, admitted "
            "in order as those end; more get 429 (0: --max-requests bounds the requests running and queued together)",
        ),
        check=at_least(0),
    )
    max_body_bytes: int = option(  # a request body other than step frames
        DEFAULT_MAX_BODY_BYTES,
        Flag(
            "--max-body-bytes",
            "the largest request body (OpenAI requests, gossip) in bytes; more get 413 (step frames "
            "may carry the hidden states of a whole context)",
        ),
        check=at_least(1),
    )
    read_timeout_s: float = option(
        DEFAULT_READ_TIMEOUT_S,
        Flag("--read-timeout", "seconds a request body may pause; then 408"),
        check=positive,
    )
    header_timeout_s: float = option(
        DEFAULT_HEADER_TIMEOUT_S,
        Flag(
            "--header-timeout", "seconds a connection may take to send a request's headers; then it is closed"
        ),
        check=positive,
    )
    swarm_key: bytes | None = option(
        None,
        Flag(
            "--swarm-key",
            "a private swarm's shared key (16+ characters; default: LAYERSWARM_SWARM_KEY): every "
            "peer-to-peer request is signed with it, and unsigned ones get 401",
        ),
        read=read_swarm_key,
    )
    api_keys: tuple[str, ...] = option(  # () = any caller
        (),
        Flag(
            "--api-key",
            "a key the OpenAI API takes as 'Authorization: Bearer KEY' (repeatable; default: any caller)",
            action="append",
        ),
        Flag("--api-key-file", "a file of API keys, one per line", default=None),
        read=read_api_keys,
    )
    metrics_key: str | None = option(  # None: /metrics is open, without the prefix cache's counters
        None,
        Flag(
            "--metrics-key",
            "a key GET /metrics then needs as 'Authorization: Bearer KEY' (401 without it), and shows "
            "the prefix cache's hits and misses for; default: /metrics is open to anyone, without "
            "those counters (a hit tells that someone sent that prompt before)",
        ),
        check=check_key,
    )
    served_model_names: tuple[str, ...] = option(  # () = the model's id
        (),
        Flag(
            "--served-model-name",
            "the model names the OpenAI API answers to; responses and /v1/models report the first "
            "(default: the model's id)",
            nargs="+",
            metavar="NAME",
        ),
        check=check_served_names,
    )
    chat_template: str | None = option(  # Jinja, in place of the model's
        None,
        Flag(
            "--chat-template",
            "a Jinja chat template in place of the model's: a file, or the template's text itself",
            metavar="TEMPLATE",
        ),
        read=lambda args: read_chat_template(args.chat_template),
    )
    allowed_origins: tuple[str, ...] = option(  # () = no CORS
        (),
        Flag(
            "--allowed-origins",
            "browser origins (SCHEME://HOST[:PORT], or *) that may call this peer's API (CORS); "
            "default: none, no CORS headers",
            default=None,
            metavar="ORIGIN[,ORIGIN...]",
        ),
        check=check_origins,
        read=lambda args: read_origins(args.allowed_origins),
    )
    identity_file: str | None = option(  # None: a new identity each start
        None,
        Flag(
            "--identity",
            "this peer's Ed25519 key (PEM), created on first start; its peer id derives from it "
            "(default: a new identity each start)",
            metavar="FILE",
        ),
    )
    max_connections: int = option(
        DEFAULT_MAX_CONNECTIONS,
        Flag("--max-connections", "open HTTP connections; more are closed at once"),
        check=at_least(1),
    )
    rebalance: bool = option(  # with layers None: move to fill a gap when this peer's span is redundant
        True, Flag("--no-rebalance", "without --layers: keep the chosen span even when a gap opens")
    )
    gossip: GossipSettings = settings(GossipSettings, GOSSIP_FLAGS)

    def __post_init__(self):
        check_fields(self)
        if self.cuda_graphs == "on":
            import torch

            if torch.device(self.device or "cpu").type != "cuda":
                raise ValueError(f"cuda_graphs 'on' needs a CUDA device, got device {self.device or 'cpu'!r}")
        if self.cpus and self.threads is not None and self.threads > len(self.cpus):
            raise ValueError(
                f"--threads {self.threads} is more than the cores --cpus {format_cpus(self.cpus)} gives "
                f"({len(self.cpus)}): give at most {len(self.cpus)} threads, or more cores"
            )
        if self.draft_model and not self.speculative:
            raise ValueError("a draft model has no use without speculative decoding (--no-speculative)")

    @property
    def address(self) -> str:
        return self.public_address or f"{self.host}:{self.port}"
