"""The tokenizer and chat template of a model (or a template given in its place), and its
stop tokens."""

from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig


class Tokenizer:
    def __init__(self, path: Path, chat_template: str | None = None):
        """`chat_template`: Jinja text that replaces the model's own chat template."""
        self._tok = AutoTokenizer.from_pretrained(path)
        if chat_template is not None:
            check_chat_template(chat_template)
            self._tok.chat_template = chat_template
        self.eos_token_ids = _eos_ids(path, self._tok)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._tok.chat_template)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Messages [{role, content}] through the chat template, ready for the assistant's turn
        (unless `add_generation_prompt` is false)."""
        if not self.has_chat_template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return self.encode(text + "assistant:" if add_generation_prompt else text)
        ids = self._tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if hasattr(ids, "keys"):  # transformers returns a BatchEncoding in recent versions
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def check_chat_template(text: str) -> None:
    """ValueError unless `text` compiles as a chat template (with the compiler, and so the Jinja
    extensions, that transformers' apply_chat_template uses)."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not compile: line {e.lineno}: {e.message}") from None


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
