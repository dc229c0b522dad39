"""Stand-ins for the door's in-process tests: a tokenizer whose token t is the character chr(t),
and metrics that only count."""

from types import SimpleNamespace


class CharTokenizer:
    """Token t is the character chr(t); token 0 ends a sequence."""

    eos_token_ids = frozenset({0})
    hf = None  # no Hugging Face tokenizer: no grammar

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(t) for t in ids)

    def token_text(self, token: int) -> str:
        return chr(token)

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class Counter:
    def __init__(self):
        self.value = 0.0

    def inc(self, by: float = 1) -> None:
        self.value += by

    def observe(self, value: float) -> None:
        self.value += 1


def metrics() -> SimpleNamespace:
    return SimpleNamespace(
        prompt_tokens=Counter(), generated_tokens=Counter(), ttft=Counter(), inter_token=Counter(), tokens=0
    )


def node(**fields) -> SimpleNamespace:
    """A peer as the door's runs and checks read it."""
    return SimpleNamespace(**{"tokenizer": CharTokenizer(), "metrics": metrics(), **fields})
