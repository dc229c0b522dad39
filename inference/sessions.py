"""The sessions of one block: its KV cache store, its prefix cache and its pool of KV slots
(which new sessions lease), so that Block itself holds only weights and the forward."""

from typing import Any

import torch

from .batch import Step
from .errors import SessionError
from .kv_cache import LOCAL, CacheStore, Sender, SessionCache
from .kv_slots import SlotPool
from .prefix_cache import BLOCK_TOKENS, PrefixCache


class Sessions:
    """Open, check and reserve the session of each step; restore and store prompt prefixes."""

    def __init__(
        self,
        span: tuple[int, int],
        hidden_size: int,
        vocab_size: int,
        max_cache_tokens: int,
        idle_timeout_s: float,
        prefix_cache_tokens: int = 0,
    ):
        self.start, self.end = span
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.store = CacheStore(max_cache_tokens, idle_timeout_s)
        self.prefixes = PrefixCache(prefix_cache_tokens)
        self.graphs: Any = None  # the block's DecodeGraphs (captured decode steps over the pool)
        self.pool: SlotPool | None = None  # KV slots that new sessions of one sequence lease
        self.reserved = 0  # token slots of the budget the pool holds

    def enable_pool(
        self, config, dtype: torch.dtype, device: torch.device, slots: int, positions: int
    ) -> SlotPool:
        """A pool of `slots` KV slots of `positions` each (inference/kv_slots.py), in place of any
        earlier one; its positions come out of the KV budget (sessions in slots hold none of it)."""
        self.store.max_tokens += self.reserved
        self.pool, self.reserved = None, 0
        reserved = slots * positions
        if reserved >= self.store.max_tokens:
            raise ValueError(
                f"a pool of {slots} slots of {positions} positions takes the whole KV "
                f"budget of {self.store.max_tokens} token slots"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = range(self.start, self.end)
        self.pool = SlotPool(layers, slots, positions, config.num_key_value_heads, head_dim, dtype, device)
        self.store.max_tokens -= reserved
        self.reserved = reserved
        return self.pool

    def __len__(self) -> int:
        return len(self.store)

    def close(self, session_id: str) -> bool:
        return self.store.close(session_id)

    def expire(self) -> list[str]:
        return self.store.expire()

    def _open(self, session_id: str, batch: int, layers: tuple[int, int], sender: Sender) -> SessionCache:
        session = self.store.open(session_id, batch, refuse_closed=True, sender=sender)
        session.layers = layers
        if self.pool is not None and batch == 1:
            lease = self.pool.lease()
            if lease is not None:
                session.bind(lease, self.pool.views(lease.slot), self.pool.positions)
        return session

    def restore_prefix(
        self,
        session_id: str,
        layers: tuple[int, int],
        prefix: tuple[int, ...],
        position: int,
        steps: int,
        sender: Sender = LOCAL,
    ) -> int:
        """Before the first forward of a one-sequence step whose prompt starts with the blocks
        hashed in `prefix`: open its session from the prefix cache where it holds them, counted
        against `sender`. Returns how many leading positions of the step need no computing (at
        position 0: the held blocks, leaving at least the last position to compute). A step that
        starts past 0 on a session this peer does not have continues a prefix the previous peer
        reused: it opens from the cache, or SessionError if the cache does not hold that much."""
        if not prefix or session_id in self.store or self.store.closed_recently(session_id):
            return 0
        held = self.prefixes.match(layers, prefix)
        if position == 0:
            blocks = min(held, (steps - 1) // BLOCK_TOKENS)
            self.prefixes.misses += (min(len(prefix), (steps - 1) // BLOCK_TOKENS) - blocks) * BLOCK_TOKENS
            if blocks == 0:
                return 0
        elif position % BLOCK_TOKENS or position // BLOCK_TOKENS > held:
            raise SessionError(
                f"session {session_id!r} continues at {position} from a reused prefix; this peer holds "
                f"{held * BLOCK_TOKENS} positions of it"
            )
        else:
            blocks = position // BLOCK_TOKENS
        session = self._open(session_id, 1, layers, sender)
        try:
            self.store.reserve(session, blocks * BLOCK_TOKENS)
        except Exception:
            self.store.close(session_id)
            raise
        self.prefixes.restore(session, layers, prefix[:blocks])
        session.advance(blocks * BLOCK_TOKENS)
        return blocks * BLOCK_TOKENS - position

    def store_prefix(self, session_id: str, prefix: tuple[int, ...]) -> None:
        """Keep the KV of a session's leading prompt blocks for later requests."""
        session = self.store.find(session_id)
        if session is None or session.batch != 1:
            return
        blocks = min(len(prefix), session.length // BLOCK_TOKENS)
        self.prefixes.store(session, session.layers, prefix[:blocks])

    def check(self, step: Step, seen: set[str]) -> tuple[int, int]:
        """The layers a step runs, after checking them and its inputs (ValueError, SessionError)."""
        start, end = step.layers or (self.start, self.end)
        if not self.start <= start < end <= self.end:
            raise ValueError(f"layers {start}:{end} are not inside this block's span {self.start}:{self.end}")
        inputs = step.inputs
        expect_ids = start == 0
        if expect_ids != (inputs.dim() == 2) or (not expect_ids and inputs.shape[-1] != self.hidden_size):
            want = "token ids [B, T]" if expect_ids else f"hidden states [B, T, {self.hidden_size}]"
            raise ValueError(f"layers {start}:{end} take {want}, got a tensor of shape {tuple(inputs.shape)}")
        if inputs.shape[0] < 1 or inputs.shape[1] < 1:
            raise ValueError(
                f"a step needs at least one sequence and one position, got {tuple(inputs.shape)}"
            )
        if (
            expect_ids
            and inputs.numel()
            and not 0 <= int(inputs.min()) <= int(inputs.max()) < self.vocab_size
        ):
            raise ValueError(
                f"token ids must be in [0, {self.vocab_size}), got {int(inputs.min())}..{int(inputs.max())}"
            )
        if step.session_id in seen:
            raise SessionError(f"session {step.session_id!r} has two steps in one batch")
        return start, end

    def session_for(self, step: Step, layers: tuple[int, int]) -> SessionCache:
        """Open, check and reserve the session of a step (CacheFullError, SessionError)."""
        batch, steps = step.inputs.shape[:2]
        if step.position == 0:
            session = self._open(step.session_id, batch, layers, step.sender)
        else:
            session = self._continue(step, batch, layers)
        try:
            self.store.reserve(session, steps)
        except Exception:
            if step.position == 0:
                self.store.close(step.session_id)  # leave no empty session behind
            raise
        return session

    def _continue(self, step: Step, batch: int, layers: tuple[int, int]) -> SessionCache:
        session = self.store.get(step.session_id)
        if session.batch == 1 < batch and session.length == step.position:
            self.store.widen(session, batch)  # n sequences continue from one shared prompt
        floor = 1 if step.rewind else session.rewind_floor
        if (
            floor is not None
            and floor <= step.position < session.length
            and (session.batch, session.layers) == (batch, layers)
        ):
            session.rewind(step.position)  # drafted positions that were not accepted
        if (session.length, session.batch, session.layers) != (step.position, batch, layers):
            raise SessionError(
                f"session {step.session_id!r} holds {session.length} positions of batch {session.batch} "
                f"for layers {session.layers[0]}:{session.layers[1]}; the step starts at {step.position} "
                f"with batch {batch} for layers {layers[0]}:{layers[1]}"
            )
        return session
