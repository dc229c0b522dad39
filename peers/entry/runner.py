"""What checked generation compares: one route's generation (a Runner) and what it saw at each
step, whether two routes computed the same step, and where they part (the suspects)."""

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from inference.sampling import MIN_TEMPERATURE
from peers.entry.generation import Checks, generate
from peers.entry.peer import EntryPeer
from peers.entry.routes import peers_of
from peers.entry.session import Observed, Token
from peers.entry.steering import Steering
from peers.swarm.commitments import Commitment, agree, greedy_choice
from peers.transport.frames import Hop, Sampling
from peers.transport.results import StepResult


@dataclass(frozen=True)
class Request:
    """What every route of one checked request generates."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop_ids: frozenset[int]
    n: int = 1
    steering: Steering | None = None


class Runner:
    """One route's generation, from the sequences so far on, and what it saw at each step."""

    def __init__(
        self,
        node: EntryPeer,
        request: Request,
        history: list[list[int]],
        avoid: Iterable[str] = (),
        strict: bool = False,
        shadowed: bool = False,
    ):
        """A generation from `history` on (see generate() and Checks), its steps observed."""
        self.last: Observed | None = None  # its latest step that made tokens
        self.tokens: list[Token] | None = None  # of its latest step
        r = request
        checks = Checks([list(h) for h in history], frozenset(avoid), strict, self._observe, shadowed)
        self.gen: AsyncIterator[list[Token]] = generate(
            node, r.prompt_ids, r.max_tokens, r.sampling, r.stop_ids, r.n, steering=r.steering, checks=checks
        )

    def _observe(self, seen: Observed) -> None:
        self.last = seen

    async def next(self) -> list[Token] | None:
        try:
            self.tokens = await anext(self.gen)
        except StopAsyncIteration:
            self.tokens = None
        return self.tokens

    @property
    def route(self) -> list[Hop]:
        return self.last.route if self.last else []

    @property
    def result(self) -> StepResult:
        assert self.last is not None, "no step made tokens yet"
        return self.last.result

    @property
    def ids(self) -> list[int]:
        return [t.token for t in self.tokens or []]

    async def close(self) -> None:
        await self.gen.aclose()


def boundaries(result: StepResult) -> dict[int, Commitment]:
    """A step's commitments by the layer they end at."""
    return {c.end: c for c in result.commitments}


@dataclass(frozen=True)
class Comparison:
    """Whether two routes computed the same step; where not, [start, end) are the layers of the
    first disagreement."""

    agree: bool
    start: int = 0
    end: int = 0


def same_step(a: StepResult, b: StepResult, greedy: bool) -> Comparison:
    """Whether two routes computed the same step: the layers of the first disagreement lie
    between the last boundary both committed to equally and the first they committed to
    differently (the model's end if only the tokens differ)."""
    ca, cb = boundaries(a), boundaries(b)
    last_equal = 0
    for end in sorted(ca.keys() & cb.keys()):
        if not agree(ca[end], cb[end]):
            return Comparison(False, last_equal, end)
        last_equal = end
    final = max([0, *ca, *cb])
    logits_agree = final in ca and final in cb  # (every shared boundary agreed above)
    ties = logits_agree and (
        not greedy or (greedy_choice(ca[final], a.tokens) and greedy_choice(cb[final], b.tokens))
    )
    if a.tokens != b.tokens and not ties:  # equal logits, other tokens: a near tie broken two ways
        return Comparison(False, last_equal, final)
    return Comparison(True)


def suspects(route: list[Hop], other: list[Hop], where: Comparison) -> list[Hop]:
    """The hops of `route` that computed layers of the disagreement `where` and are not
    `other`'s peers."""
    theirs = peers_of(other)
    return [h for h in route if h.start < where.end and h.end > where.start and h.peer_id not in theirs]


def true_tokens(node: EntryPeer, route: list[Hop], result: StepResult, tokens: list[Token]) -> bool:
    """Greedy tokens must be the argmax of the logits the last peer signed; one that answers
    another token convicts itself (its own signature is the evidence)."""
    last = route[-1]
    final = next((c for c in result.commitments if c.end == last.end), None)
    if final is not None and greedy_choice(final, [t.token for t in tokens]):
        return True
    node.convict(last.peer_id, "its greedy token is not the argmax of the logits it signed")
    return False


def plain_greedy(sampling: Sampling, steering: Steering | None) -> bool:
    """Greedy on the model's own logits, so that a committed step's token must be their argmax
    (a penalty, a bias or a grammar chooses otherwise)."""
    return (sampling.temperature < MIN_TEMPERATURE or sampling.top_k == 1) and not (
        steering is not None or sampling.steered
    )
