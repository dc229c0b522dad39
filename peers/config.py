"""A peer's options: the frozen settings `peer serve` builds from its flags."""

import re
from dataclasses import dataclass, field

import torch

from inference.quant import QUANT_MODES
from inference.scheduler import SchedulerSettings
from peers.swarm.membership import GossipSettings
from peers.transport.limits import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_READ_TIMEOUT_S,
)
from peers.transport.wire import ENCODINGS, LOSSLESS

CORE_TURNS = ("auto", "on", "off")
CUDA_GRAPHS = {"auto": None, "on": True, "off": False}  # --cuda-graphs -> load_block's cuda_graphs
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s]+")  # what a browser's Origin header holds


@dataclass(frozen=True)
class NodeConfig:
    model: str = "smollm2-135m"
    layers: str | None = None  # "A:B"; None chooses automatically
    num_layers: int | None = None  # with layers None: how many to serve
    host: str = "127.0.0.1"
    port: int = 7001
    public_address: str | None = None  # what others dial; host:port by default
    join: tuple[str, ...] = ()
    device: str | None = None
    dtype: str | None = None
    quant: str = "none"  # this peer's weights: none, int8 or int4 (weight-only, inference/quant.py)
    threads: int | None = None  # torch threads; None: the cores shared among this host's peers
    core_turns: str = "auto"  # on, off, or auto: on while co-located peers' threads outnumber the cores
    cuda_graphs: str = "auto"  # decode steps captured as CUDA graphs: on, off, or auto (on a CUDA device)
    max_cache_tokens: int = 65536
    session_idle_s: float = 120.0
    hop_timeout_s: float = 30.0  # a hop's deadline: this, plus hop_timeout_per_token_s per position
    hop_timeout_per_token_s: float = 0.02
    failover_timeout_s: float = 60.0  # how long an entry keeps trying to re-route one request
    sse_keepalive_s: float = 5.0  # a stream sends a comment line after this long without an event
    ban_s: float = 5.0  # first ban of a failed peer; doubles on each repeat, up to ban_max_s
    ban_max_s: float = 120.0
    drain_s: float = 10.0  # on leave: how long in-flight requests may finish
    rebalance: bool = True  # with layers None: move to fill a gap when this peer's span is redundant
    max_requests: int = 64  # requests this entry serves at once; more get 429
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # a request body other than step frames
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S  # the longest pause while a body arrives
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S  # to send a request's headers
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open HTTP connections; more are closed
    swarm_key: bytes | None = field(default=None, repr=False)  # a private swarm's shared key
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # keys the OpenAI door takes; () = any caller
    verify_rate: float = (
        0.0  # share of requests this entry checks on a second route (peers/entry/consensus.py)
    )
    liar_ban_s: float = 3600.0  # how long a peer convicted of computing wrong is avoided
    self_referee: bool = False  # with no third replica, this entry recomputes disputed layers itself
    identity_file: str | None = None  # this peer's Ed25519 key, created on first start; None: new each start
    prefix_reuse: bool = True  # reuse the KV of prompt prefixes this peer computed before
    prefix_cache_tokens: int = 16384  # token slots of KV kept for prefix reuse
    speculative: bool = (
        True  # requests entering here draft tokens the chain checks (peers/entry/speculative.py)
    )
    direct_return: bool = True  # results of this entry's steps come straight from the last peer
    draft_model: str | None = None  # a small model sharing the tokenizer, run here to draft tokens
    served_model_names: tuple[str, ...] = ()  # names the OpenAI API answers to; () = the model's id
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed by CORS ("*": any); () = no CORS
    chat_template: str | None = field(default=None, repr=False)  # Jinja, in place of the model's
    wire: str = LOSSLESS  # how hidden states travel to next hops that accept it (peers/transport/wire.py)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    gossip: GossipSettings = field(default_factory=GossipSettings)

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        for name in ("hop_timeout_s", "failover_timeout_s", "ban_s", "session_idle_s", "sse_keepalive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hop_timeout_per_token_s < 0:
            raise ValueError(f"hop_timeout_per_token_s must be >= 0, got {self.hop_timeout_per_token_s}")
        for name in ("read_timeout_s", "header_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("num_layers", "threads", "max_requests", "max_body_bytes", "max_connections"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.wire not in ENCODINGS:
            raise ValueError(f"wire must be one of {', '.join(ENCODINGS)}, got {self.wire!r}")
        if self.core_turns not in CORE_TURNS:
            raise ValueError(f"core_turns must be one of {', '.join(CORE_TURNS)}, got {self.core_turns!r}")
        if self.quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_MODES)}, got {self.quant!r}")
        if self.cuda_graphs not in CUDA_GRAPHS:
            raise ValueError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPHS)}, got {self.cuda_graphs!r}")
        if self.cuda_graphs == "on" and torch.device(self.device or "cpu").type != "cuda":
            raise ValueError(f"cuda_graphs 'on' needs a CUDA device, got device {self.device or 'cpu'!r}")
        if not 0 <= self.verify_rate <= 1:
            raise ValueError(f"verify_rate must be in [0, 1], got {self.verify_rate}")
        if self.liar_ban_s <= 0:
            raise ValueError(f"liar_ban_s must be positive, got {self.liar_ban_s}")
        if self.draft_model and not self.speculative:
            raise ValueError("a draft model has no use without speculative decoding (--no-speculative)")
        if self.prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be >= 0, got {self.prefix_cache_tokens}")
        for name in self.served_model_names:
            if not name.strip() or name != name.strip():
                raise ValueError(
                    f"a served model name is a non-empty name without spaces around it, got {name!r}"
                )
        if len(set(self.served_model_names)) < len(self.served_model_names):
            raise ValueError(f"served model names repeat: {', '.join(self.served_model_names)}")
        for origin in self.allowed_origins:
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"an allowed origin is * or SCHEME://HOST[:PORT] without a path, got {origin!r}"
                )

    @property
    def address(self) -> str:
        return self.public_address or f"{self.host}:{self.port}"
