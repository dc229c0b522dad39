"""A request's session on one route (Petals' inference session): its id, route, shadows and the
seals that tell each hop which shadow it feeds, the position the peers hold, and the steps that (re)build it: the prompt plus every token generated
so far, replayed as one prefill on a new route after a failure."""

import struct
import uuid
from dataclasses import dataclass, field

import xxhash

from inference.sampling import PositionScore, Score
from peers.transport.frames import Controls, Hop
from peers.transport.results import StepResult


@dataclass(frozen=True)
class Token:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the likeliest tokens and their logprobs (top_logprobs)


def tokens_of(result: StepResult) -> list[Token]:
    """The tokens a step sampled, with their logprobs and alternatives."""
    tops = result.alternatives or [()] * len(result.tokens)
    return [Token(t, lp, top) for t, lp, top in zip(result.tokens, result.logprobs, tops, strict=True)]


@dataclass(frozen=True)
class Rebuild:
    """One step that (re)builds a session: its rows [B][T], and whether it widens the session
    (the prompt but its last token, sent once before n sequences sample their first tokens)."""

    rows: list[list[int]]
    widens: bool = False


def replay_plan(prompt_ids: list[int], generated: list[list[int]], n: int) -> list[Rebuild]:
    """The steps that (re)build a session. One sequence: the whole history as one prefill.
    Several from scratch: the prompt but its last token once, then that token once per sequence
    (the session widens; every sequence samples its own first token). Several after a
    failover: each sequence's own history, all in one prefill."""
    if n == 1 or generated[0]:
        return [Rebuild([prompt_ids + g for g in generated])]
    if len(prompt_ids) == 1:
        return [Rebuild([prompt_ids] * n)]
    return [Rebuild([prompt_ids[:-1]], widens=True), Rebuild([prompt_ids[-1:]] * n)]


def context_digest(prompt_ids: list[int], generated: list[list[int]]) -> str:
    """A digest of the tokens a step continues: hops sign it with their commitments."""
    h = xxhash.xxh3_128(struct.pack(f"<{len(prompt_ids)}q", *prompt_ids))
    for g in generated:
        h.update(b"|" + struct.pack(f"<{len(g)}q", *g))
    return h.hexdigest()


@dataclass(frozen=True)
class Ask:
    """What one step sends besides the session: rows [B][T], the prompt's prefix hashes (prefix
    reuse), the context digest hops sign (checked steps), how many of the one row's last tokens
    are drafted, and the steering controls of each sampled position."""

    rows: list[list[int]]
    prefix: tuple[int, ...] = ()
    verify: str = ""
    draft: int = 0
    controls: tuple[Controls, ...] = ()
    score: Score | None = None  # prompt logprobs asked of the last peer (a step at position 0)


@dataclass
class Prefill:
    """What a generation's prefill tells its caller: how many prompt tokens the route's peers
    restored from their prefix caches (the last prefill's, after a failover), and, where asked
    (`score_top`: that many likeliest tokens at each position besides the prompt's own), the
    prompt logprobs: `positions` scores the prompt's tokens after its first once the step that
    brings them went through (a prefill that reuses no prefix)."""

    score_top: int | None = None
    positions: tuple[PositionScore, ...] | None = None
    cached_tokens: int = 0

    def wanted(self, prompt_ids: list[int], rows: list[list[int]]) -> Score | None:
        """What a step of `rows` at position 0 asks for, while the scores are missing."""
        if self.score_top is None or self.positions is not None:
            return None
        return Score(tuple(prompt_ids[1 : len(rows[0]) + 1]), self.score_top)


def new_session_id() -> str:
    return uuid.uuid4().hex


@dataclass
class RouteSession:
    """One request's sequences on one route at a time. `generated` holds every sequence's tokens
    so far; `pending` the steps left before the next one samples every sequence's next token."""

    prompt_ids: list[int]
    generated: list[list[int]]
    session_id: str = field(default_factory=new_session_id)
    route: list[Hop] | None = None
    shadows: tuple[Hop, ...] = ()  # the replicas that recompute hops (the entry alone knows them)
    seals: tuple[str, ...] = ()  # one per hop of the route (StepRequest.seals), for every step
    position: int = 0  # tokens the route's peers hold of this session
    pending: list[Rebuild] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.generated)

    @property
    def hops(self) -> list[Hop]:
        """Every peer that holds this session: the route's and the shadows'."""
        return [*(self.route or []), *self.shadows]

    def open(self, route: list[Hop], shadows: tuple[Hop, ...] = (), seals: tuple[str, ...] = ()) -> None:
        """Start on `route`: replay the prompt and everything generated so far."""
        self.route, self.shadows, self.seals, self.position = route, shadows, seals, 0
        self.pending = replay_plan(self.prompt_ids, self.generated, self.n)

    def drop(self) -> tuple[str, list[Hop]]:
        """Leave the route (it failed): the session id and hops to close; the next step opens a
        new session on a new route."""
        old = (self.session_id, self.hops)
        self.session_id, self.route, self.shadows, self.pending = new_session_id(), None, (), []
        self.seals = ()
        return old

    def next_rebuild(self) -> Rebuild:
        """The next step's rows: what is left to replay, else every sequence's last token."""
        if self.pending:
            return self.pending[0]
        return Rebuild([[g[-1]] for g in self.generated])

    def sent(self, tokens: int) -> None:
        """A step of `tokens` positions per row went through: the peers hold them."""
        self.position += tokens
        self.pending = self.pending[1:]

    def take(self, i: int, token: int) -> None:
        """Sequence i took `token`."""
        self.generated[i].append(token)


@dataclass(frozen=True)
class Observed:
    """A step that made tokens, as checked generation sees it: its route and what came back."""

    route: list[Hop]
    result: StepResult
