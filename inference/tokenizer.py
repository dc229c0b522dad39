"""The tokenizer and chat template of a model (or a template given in its place), and its
stop tokens."""

from functools import cached_property
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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    @property
    def hf(self):
        """The Hugging Face tokenizer (grammar engines build their own view of it)."""
        return self._tok

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders a `tools` list itself (else a generic prompt does)."""
        return "tools" in (self._tok.chat_template or "")

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        continue_final_message: bool = False,
        template_kwargs: dict | None = None,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """Messages [{role, content}] through the chat template, ready for the assistant's turn
        (unless `add_generation_prompt` is false; with `continue_final_message`, continuing the
        last message, an assistant's); `template_kwargs`: more variables the template reads
        (e.g. enable_thinking), among `template_variables`. `add_special_tokens`: the tokenizer's
        special tokens (a BOS) added on top of what the template writes, as vLLM's option (a model
        without a chat template: its generic prompt carries them already, and it is refused)."""
        if not self.has_chat_template:
            if add_special_tokens:
                raise ValueError(
                    "the model has no chat template: its generic chat prompt carries the special tokens"
                )
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            if continue_final_message:
                return self.encode(text.removesuffix("\n"))
            return self.encode(text + "assistant:" if add_generation_prompt else text)
        rendered = self._tok.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            tokenize=not add_special_tokens,
            **(template_kwargs or {}),
        )
        if add_special_tokens:  # the rendered text, encoded as a prompt is
            return self.encode(rendered, add_special_tokens=True)
        ids = rendered
        if hasattr(ids, "keys"):  # transformers returns a BatchEncoding in recent versions
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int], keep: frozenset[int] = frozenset()) -> str:
        """The text of `ids` without special tokens, except those in `keep` (markers that a
        reasoning format reads, such as GPT-OSS's `<|channel|>`)."""
        if not keep:
            return self._tok.decode(ids, skip_special_tokens=True)
        special = self._special_ids
        return self._tok.decode([i for i in ids if i in keep or i not in special], skip_special_tokens=False)

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        added = (i for i, t in self._tok.added_tokens_decoder.items() if t.special)
        return frozenset(self._tok.all_special_ids) | frozenset(added)

    @property
    def chat_template(self) -> str:
        """The chat template's text ("" for none; of several named ones, the default)."""
        template = self._tok.chat_template or ""
        return template.get("default", "") if isinstance(template, dict) else template

    @cached_property
    def template_variables(self) -> frozenset[str]:
        """The variables the chat template reads that nothing sets for it: the names that
        `template_kwargs` may give."""
        return template_variables(self.chat_template) if self.has_chat_template else frozenset()

    def info(self) -> dict:
        """The tokenizer's settings, as vLLM's /tokenizer_info gives them: its init arguments
        (special tokens as their text, added tokens by id; no file paths), its class, the chat
        template in use, and the special tokens' ids."""
        tok = self._tok
        kept = {k: v for k, v in tok.init_kwargs.items() if not k.endswith("_file") and k != "name_or_path"}
        info = {**_plain(kept), "tokenizer_class": type(tok).__name__}
        info.pop("chat_template", None)
        if self.has_chat_template:
            info["chat_template"] = self.chat_template
        for name in ("bos", "eos", "pad", "unk"):
            info[f"{name}_token"] = getattr(tok, f"{name}_token")
            info[f"{name}_token_id"] = getattr(tok, f"{name}_token_id")
        return info

    def vocab_ids(self, *names: str) -> dict[str, int]:
        """The ids of those of these tokens that the vocabulary has."""
        vocab = self._tok.get_vocab()
        return {n: vocab[n] for n in names if n in vocab}

    def token_pieces(self, ids: list[int]) -> list[str]:
        """The vocabulary's entries for `ids` as it spells them (byte-level BPE writes a space as
        'Ġ'), as vLLM's /tokenize gives `token_strs`."""
        return list(self._tok.convert_ids_to_tokens(ids))

    def token_text(self, token: int) -> str:
        """One token on its own, special tokens included (logprobs name tokens so)."""
        return self._tok.decode([token], skip_special_tokens=False)

    def special_ids(self, *names: str) -> list[int] | None:
        """The ids of these special tokens, or None if the vocabulary lacks any of them."""
        vocab = self._tok.get_vocab()
        return [vocab[n] for n in names] if all(n in vocab for n in names) else None


def check_chat_template(text: str) -> None:
    """ValueError unless `text` compiles as a chat template (with the compiler, and so the Jinja
    extensions, that transformers' apply_chat_template uses)."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not compile: line {e.lineno}: {e.message}") from None


def template_variables(text: str) -> frozenset[str]:
    """The undeclared variables of a chat template (read, never set inside it)."""
    from jinja2 import meta
    from transformers.utils.chat_template_utils import _compile_jinja_template

    environment = _compile_jinja_template(text).environment
    return frozenset(meta.find_undeclared_variables(environment.parse(text)))


def _plain(value):
    """`value` as JSON takes it: an added token as its text, a mapping's keys as strings."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


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
