"""The scheduler's types: a job (one session's step through this peer's layers), what comes of
it (`Sampled` tokens, or `Busy`/`NonFinite`), and the scheduler's settings and counters."""

import asyncio
from dataclasses import dataclass, field

import torch

from inference.block import Block
from inference.kv_cache import LOCAL, Sender
from inference.sampling import Controls, PositionScore, Sampling, Score


@dataclass(frozen=True)
class Sampled:
    """The tokens a step chose (these layers end the model): one per sequence, or draft + 1 for
    a drafted step, with their logprobs."""

    tokens: list[int]
    logprobs: list[float]
    top: tuple | None = field(default=None, repr=False)  # the last logits' top entries, when committing
    # with sampling.top_logprobs: per sampled token, the likeliest tokens and their logprobs
    alternatives: tuple[tuple[tuple[int, float], ...], ...] = ()
    prompt: tuple[PositionScore, ...] = ()  # with Job.score: the scored positions, in order


class Busy(Exception):
    """This peer is healthy but cannot take the step now; the message names the limit."""


class NonFinite(Exception):
    """This peer's layers produced NaN or infinity."""


@dataclass(frozen=True)
class SchedulerSettings:
    max_batch_tokens: int = 512  # positions in one forward (B x T summed over its steps)
    prefill_chunk: int = 256  # a prompt runs in chunks of at most this many positions
    max_queue: int = 1024  # steps waiting or running; more are Busy at once
    max_queue_wait_s: float = 10.0  # a step not started by then is Busy
    # While sessions that stepped here moments ago are still on their way back (mid-round on
    # the other peers), a forward waits up to this long for them, so that the sessions of a
    # swarm move in one wave and batches stay large. Never when idle: only sessions seen within
    # RECENT_S (inference/scheduler.py) are waited for, and their arrival starts the forward at once. None: while this
    # peer shares its machine's cores with other peers, wait for those due back (by their last
    # round time here) within MERGE_FRACTION of the queued sessions' round time (COLOCATED_WAIT_S
    # while either is unknown; at most MAX_MERGE_WAIT_S), so that waves that drifted apart merge
    # (of two waves, one is at most half a round behind the other), while a session that is
    # slow to come back does not hold the others: there, forwards run in turns on the same
    # cores, and one forward of all sessions costs far less than one per wave. Otherwise 0:
    # every peer computes while the others' outputs travel.
    batch_wait_s: float | None = None
    # Pipelined micro-batches: while this peer does not share its cores with other peers, a
    # forward takes at most 1/stages of the decode steps of the sessions stepping here (those
    # seen within RECENT_S), and waits for that many while the missing ones are due back (as
    # co-located waves do: MERGE_FRACTION of their round time, at most MAX_MERGE_WAIT_S), so
    # that the sessions of a pipeline of `stages` peers move as that many whole micro-batches,
    # one computing on each stage, instead of one batch that leaves every stage but one idle or
    # many small ones that each pay for reading the weights. Off: every queued decode step runs
    # in the next forward.
    micro_batches: bool = True

    def __post_init__(self):
        for name in ("max_batch_tokens", "prefill_chunk", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_wait_s <= 0:
            raise ValueError(f"max_queue_wait_s must be positive, got {self.max_queue_wait_s}")
        if self.batch_wait_s is not None and self.batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {self.batch_wait_s}")


@dataclass(eq=False)
class Job:
    """One session's step through this peer's layers."""

    session_id: str
    inputs: torch.Tensor  # [B, T] ids or [B, T, H] hidden states
    position: int
    layers: tuple[int, int]
    sampling: Sampling | None = None  # set when these layers end the model: sample the next token
    prefix: tuple[int, ...] = ()
    future: asyncio.Future | None = None
    enqueued: float = 0.0
    started: float | None = None
    done: int = 0  # positions computed (or restored from the prefix cache) so far
    skipped: int = 0  # leading positions restored from the prefix cache: the output starts after them
    outputs: list[torch.Tensor] = field(default_factory=list)
    compute_s: float = 0.0
    block: Block | None = None  # the block the step was checked against; another one refuses it
    commit: bool = False  # the last hop keeps the top entries of its logits (peers/swarm/commitments.py)
    draft: int = 0  # drafted tokens at the end: sample after each of the last draft + 1 positions
    controls: tuple[Controls, ...] = ()  # per sampled row, or none (see StepRequest.controls)
    sender: Sender = LOCAL  # who sent the step (its KV counts against that sender: inference/kv_cache.py)
    stages: int = 1  # stages of the pipeline the step runs through (its route's hops): micro-batches
    score: Score | None = None  # (the model's last layers) prompt logprobs of the step's positions
    scores: list[PositionScore] = field(default_factory=list)  # those of the chunks computed so far

    @property
    def batch(self) -> int:
        return self.inputs.shape[0]

    @property
    def is_decode(self) -> bool:
        """One position left, or a drafted step (decoded as one, never cut into chunks)."""
        return self.remaining == 1 or bool(self.draft)

    @property
    def remaining(self) -> int:
        return self.inputs.shape[1] - self.done


@dataclass
class SchedulerStats:
    steps: int = 0
    batches: int = 0
    positions: int = 0
    busy: int = 0
    queue_wait_s: float = 0.0  # summed over started steps
    compute_s: float = 0.0  # summed over forwards (without waits for the cores)
    turn_wait_s: float = 0.0  # summed waits for co-located peers' forwards (--core-turns)
    turns_skipped: int = 0  # forwards run without a turn: a co-located peer held it too long
    max_batch_steps: int = 0
    decode_batches: int = 0  # forwards of decode steps only (drafted ones included)
    decode_compute_s: float = 0.0  # their compute seconds: what a peer's published speed is made of

    def to_json(self) -> dict:
        return {
            "steps": self.steps,
            "batches": self.batches,
            "positions": self.positions,
            "busy": self.busy,
            "mean_batch_steps": round(self.steps / self.batches, 2) if self.batches else 0.0,
            "max_batch_steps": self.max_batch_steps,
            "mean_queue_wait_ms": round(1000 * self.queue_wait_s / self.steps, 2) if self.steps else 0.0,
            "compute_s": round(self.compute_s, 3),
            "turn_wait_s": round(self.turn_wait_s, 3),
            "turns_skipped": self.turns_skipped,
        }
