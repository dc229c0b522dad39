"""The tokenizer and chat template of a model, and its stop tokens."""

from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig


class Tokenizer:
    def __init__(self, path: Path):
        self._tok = AutoTokenizer.from_pretrained(path)
        self.eos_token_ids = _eos_ids(path, self._tok)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._tok.chat_template)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Messages [{role, content}] through the chat template, ready for the assistant's turn."""
        if not self.has_chat_template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return self.encode(text)
        ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers returns a BatchEncoding in recent versions
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _eos_ids(path: Path, tok) -> frozenset[int]:
    ids = set()
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    for value in (eos, tok.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)
