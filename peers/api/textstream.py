"""Tokens to text deltas for one sequence, with stop strings: text that could still become a stop
string is held back until it cannot. Decoding is incremental: each token decodes only a short
window (the last settled tokens as context, then the new ones), so a long generation costs linear,
not quadratic, tokenizer time."""

from inference import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str], keep: frozenset[int] = frozenset()):
        """`keep`: special tokens kept in the text (a reasoning format's markers)."""
        self.tokenizer, self.keep = tokenizer, keep
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters of text already given out
        self.stopped = False
        self._context = 0  # tokens[_context:_settled] are decoded already and give context
        self._settled = 0

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to send."""
        self.tokens.append(token)
        before = self._decode(self.tokens[self._context : self._settled])
        after = self._decode(self.tokens[self._context :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""  # an incomplete UTF-8 sequence, or nothing visible yet: wait for more tokens
        text = self.text + after[len(before) :]
        self._context, self._settled = self._settled, len(self.tokens)
        self.text = text
        hits = [at for s in self.stop if (at := text.find(s, max(0, self.sent - len(s) + 1))) != -1]
        if hits:  # the earliest match in the text wins, whichever stop string it is
            self.text, self.stopped = text[: min(hits)], True
            return self._take(len(self.text))
        return self._take(max(self.sent, len(text) - self._held(text)))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.keep) if self.keep else self.tokenizer.decode(ids)

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        return partial_tail(text, self.stop)

    def finish(self) -> str:
        """The rest of the text, once generation has ended."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent : upto]
        self.sent = upto
        return out


def partial_tail(text: str, markers) -> int:
    """Length of the longest tail of `text` that begins (and is not the whole of) one of `markers`:
    held back, as a marker may be arriving."""
    held = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), held, -1):
            if text.endswith(m[:k]):
                held = k
                break
    return held
