"""What a request asks of each step beyond its sampling parameters, kept by its entry: each
sequence's token counts (penalties), the stop ids banned before min_tokens, and a grammar's mask;
sent with each step as protocol Controls, applied by the last peer (scheduler)."""

from collections import Counter
from dataclasses import dataclass

from inference.grammar import Matcher, pack_mask
from peers.transport.frames import Controls


@dataclass(frozen=True)
class Steering:
    """The request's side: built once, started once per generation (consensus and verification
    restart generations from their history: each start replays it)."""

    tokenizer: object  # the Hugging Face tokenizer (grammar masks)
    vocab_size: int
    stop_ids: frozenset[int]  # the model's end-of-turn ids and the request's stop_token_ids
    min_tokens: int = 0  # before that many tokens, no stop id
    counts: bool = False  # send each sequence's token counts (penalties)
    grammar: str | None = None  # every sequence's text follows it (inference/grammar.py)

    def start(self, generated: list[list[int]]) -> "SteerState":
        return SteerState(self, generated)


@dataclass(frozen=True)
class SteeredDraft:
    """A draft as steering lets it go: cut where the grammar refuses it, with the controls of each
    of its draft + 1 sampled positions."""

    draft: list[int]
    controls: tuple[Controls, ...]


class SteerState:
    """One generation's side: one grammar matcher and one token count per sequence."""

    def __init__(self, steering: Steering, generated: list[list[int]]):
        self.steering = steering
        self.counts = [Counter() for _ in generated]
        self.done = [False] * len(generated)  # met a stop id: what follows is not steered
        self.matchers: list[Matcher | None] = [None] * len(generated)
        self.masks: list[bytes | None] = []  # those of the controls sent last, unpacked
        if steering.grammar is not None:
            self.matchers = [
                Matcher(steering.tokenizer, steering.grammar, steering.stop_ids, steering.vocab_size)
                for _ in generated
            ]
        for i, tokens in enumerate(generated):
            for token in tokens:
                self.advance(i, token)

    def controls(self, generated: list[list[int]]) -> tuple[Controls, ...]:
        """One per sequence, for a step that samples each sequence's next token."""
        self.masks = [
            None if m is None or done else m.mask() for m, done in zip(self.matchers, self.done, strict=True)
        ]
        return tuple(self._row(len(g), self.counts[i], self.masks[i]) for i, g in enumerate(generated))

    def drafted(self, generated: list[int], draft: list[int]) -> SteeredDraft:
        """For a drafted step of the one sequence: the draft cut where the grammar refuses it, and
        controls for each of its draft + 1 sampled positions (as if the draft had been taken)."""
        matcher = self.matchers[0]
        self.masks = matcher.draft_masks(draft) if matcher is not None else [None] * (len(draft) + 1)
        draft = draft[: len(self.masks) - 1]
        counts, rows = Counter(self.counts[0]), []
        for j, mask in enumerate(self.masks):
            rows.append(self._row(len(generated) + j, counts, mask))
            if j < len(draft):
                counts[draft[j]] += 1
        return SteeredDraft(draft, tuple(rows))

    def _row(self, length: int, counts: Counter, mask: bytes | None) -> Controls:
        s = self.steering
        return Controls(
            counts=tuple(sorted(counts.items())) if s.counts else (),
            banned=tuple(sorted(s.stop_ids)) if length < s.min_tokens else (),
            mask=None if mask is None else pack_mask(mask),
        )

    def violation(self, controls: tuple[Controls, ...], tokens: list[int]) -> str | None:
        """Why the sampled `tokens` (one per row of the last controls sent) break them, or None."""
        for row, mask, token in zip(controls, self.masks, tokens, strict=True):
            if token in row.banned:
                return f"it sampled token {token}, which the step banned"
            if mask is not None and not (mask[token // 8] >> (token % 8)) & 1:
                return f"it sampled token {token}, which the step's grammar mask forbids"
        return None

    def advance(self, i: int, token: int) -> None:
        """Sequence i took `token` (a grammar's matcher refuses a token it forbids: GrammarError)."""
        if self.done[i]:
            return
        self.counts[i][token] += 1
        if self.matchers[i] is not None:
            self.matchers[i].consume(token)
        self.done[i] = token in self.steering.stop_ids
