"""Constrained decoding: grammars for JSON and tool calls, and a per-sequence matcher that says
which tokens may come next (built on llguidance).

The protocol, one Matcher per generated sequence:
- The entry peer (it has the tokenizer) builds `Matcher(tokenizer, grammar, stop_ids, vocab_size)`.
- Before each step it computes `mask()` and ships `pack_mask(mask)` in a JSON header to the last
  peer of the chain, which runs `apply_mask(logits, unpack_mask(text, vocab_size))` and samples.
- After the step the entry feeds the sampled token to `consume(token)`; `finished` says that only
  a stop id may follow. For speculative decoding, `draft_masks(tokens)` gives the mask before each
  draft token the grammar accepts, and leaves the matcher as it was.
- A stop id (any of `stop_ids`) is allowed exactly when the grammar may end, and is the only
  thing allowed once it is complete; ids past the tokenizer's vocabulary are never allowed.

Masks are packed little-endian bitmasks: token i is bit i % 32 of int32 word i // 32 (the layout
of llguidance's and xgrammar's token bitmasks), 4 * ceil(vocab_size / 32) bytes.

API:
    GrammarError(ValueError)                   a schema, grammar or token the engine refuses
    json_object_grammar() -> str
    json_schema_grammar(schema: dict) -> str   raises GrammarError now, not mid-generation nor
        as a crash: a $ref loop with no finite value, $refs nested too deep (schema_refs.py)
    tool_call_grammar(tools: list[dict], name: str | None = None, parallel: bool = True) -> str
    parse_tool_calls(text: str) -> tuple[str, list[dict]]
    Matcher(tokenizer, grammar: str, stop_ids: frozenset[int], vocab_size: int)
        .mask() -> bytes; .consume(token: int) -> None; .draft_masks(tokens) -> list[bytes]
        .finished -> bool
    apply_mask(logits: torch.Tensor, mask: bytes) -> None
    pack_mask(mask: bytes) -> str;  unpack_mask(text: str, vocab_size: int) -> bytes

JSON is generated in one fixed layout, the one `json.dumps` writes: ", " between items, ": "
after keys, no other whitespace (flexible whitespace lets a model pad forever). A tool call is
`<tool_call>\\n{"name": "<fn>", "arguments": {...}}\\n</tool_call>`, calls separated by "\\n".

The engine's own error text (its parser state, the whole grammar) never reaches a GrammarError's
message, which callers may show to clients: it is logged, and the message says what failed.
"""

import base64
import binascii
import functools
import json
import logging
import re
import threading
import weakref
import zlib

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerFast

from .sampling import allowed
from .schema_refs import rebased, schema_problem

# How JSON is laid out: json.dumps' separators, no free whitespace.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # parameters left out
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

log = logging.getLogger("layerswarm.grammar")


class GrammarError(ValueError):
    """A schema or grammar the engine refuses, or a token the grammar forbids; says why."""


def json_object_grammar() -> str:
    """Any JSON object."""
    return json_schema_grammar({"type": "object"})


def json_schema_grammar(schema: dict) -> str:
    """JSON text that validates against `schema` (draft 2020-12, as llguidance supports it:
    unsupported keywords and formats are refused, not ignored)."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, not {type(schema).__name__}")
    problem = schema_problem(schema)  # before the engine: too deep would crash it, a loop fail later
    if problem is not None:
        raise GrammarError(f"invalid JSON schema: {problem}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_LAYOUT)
    except (TypeError, ValueError, RecursionError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None
    check_grammar(grammar, "JSON schema")
    check_start(grammar, "JSON schema")
    return grammar


def tool_call_grammar(tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
    """One tool call (with `parallel`, one or more, separated by "\\n") of the OpenAI-style
    `tools`; with `name`, of that function only."""
    if not isinstance(tools, list) or not tools:
        raise GrammarError("tools must be a non-empty list of tool definitions")
    calls = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise GrammarError(f"tools[{i}] is not a {{'type': 'function', 'function': {{'name': ...}}}}")
        params = fn.get("parameters", _NO_ARGUMENTS)
        if not isinstance(params, dict):
            raise GrammarError(f"tool {fn['name']!r}: parameters must be a JSON schema object")
        if fn["name"] in calls:
            raise GrammarError(f"two tools named {fn['name']!r}")
        try:
            json_schema_grammar(params)  # refuse a bad schema here, naming its tool
        except GrammarError as e:
            raise GrammarError(f"tool {fn['name']!r}: {e}") from None
        calls[fn["name"]] = {
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
    if name is not None:
        if name not in calls:
            raise GrammarError(f"no tool named {name!r} among {sorted(calls)}")
        calls = {name: calls[name]}
    alternatives = list(calls.values())
    for i, call in enumerate(alternatives):  # a tool's own $refs ("#/$defs/x") point into it still
        arguments = rebased(call["properties"]["arguments"], f"/anyOf/{i}/properties/arguments")
        call["properties"] = {**call["properties"], "arguments": arguments}
    body = json.dumps({"x-guidance": _JSON_LAYOUT, "anyOf": alternatives})
    more = ' ("\\n" call)*' if parallel else ""
    lark = f'start: call{more}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json {body}\n'
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    check_grammar(grammar, "tool call grammar")
    return grammar


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the text outside well-formed `<tool_call>` blocks, stripped; the calls [{"name",
    "arguments"}]). A block whose body is not a call stays in the text."""
    calls, kept, end = [], [], 0
    for m in _TOOL_CALL.finditer(text):
        call = _parse_call(m.group(1))
        if call is None:
            continue
        calls.append(call)
        kept.append(text[end : m.start()])
        end = m.end()
    kept.append(text[end:])
    return "".join(kept).strip(), calls


def _parse_call(body: str) -> dict | None:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return {"name": call["name"], "arguments": args} if isinstance(args, dict) else None


def check_grammar(grammar: str, what: str) -> None:
    """GrammarError naming `what` unless the engine compiles `grammar`."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:  # the first line: the rest is the engine's copy of the grammar
        log.warning("%s refused: %s", what, messages[0] if messages else "")
        raise GrammarError(
            f"{what} refused: {messages[0].splitlines()[0] if messages else 'no reason given'}"
        )


def check_start(grammar: str, what: str) -> None:
    """The engine can begin `grammar`: its first mask over a byte vocabulary computes."""
    m = llguidance.LLMatcher(_byte_vocab(), grammar, log_level=0)
    m.compute_bitmask()
    if m.is_error():
        log.warning("%s refused at its first mask: %s", what, m.get_error())
        raise GrammarError(f"invalid {what}: no output satisfies it")


@functools.cache
def _byte_vocab() -> llguidance.LLTokenizer:
    """A tokenizer of the 256 bytes and an end token: enough to ask the engine how a grammar starts."""
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))


class _Bytes:
    eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
    tokens = [bytes([i]) for i in range(256)] + [b"\xff<end>"]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


def _label(grammar: str) -> str:
    """What `grammar` is, for messages: a JSON schema's, tool calls' (as built here) or other."""
    try:
        whole = json.loads(grammar) if grammar.lstrip().startswith("{") else None
    except ValueError:
        whole = None
    parts = whole.get("grammars") if isinstance(whole, dict) else None
    if isinstance(parts, list) and parts and all(isinstance(p, dict) and "json_schema" in p for p in parts):
        return "JSON schema"
    return "tool call grammar" if '"<tool_call>' in grammar else "grammar"


# --- the engine's view of a tokenizer: built once per tokenizer object (~0.5 s for 49k tokens)

_ll_tokenizers: "weakref.WeakKeyDictionary[object, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()
_ll_tokenizers_lock = threading.Lock()


def ll_tokenizer(tokenizer: PreTrainedTokenizerFast) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for a Hugging Face fast tokenizer, cached while `tokenizer` lives."""
    with _ll_tokenizers_lock:
        ll = _ll_tokenizers.get(tokenizer)
        if ll is None:
            ll = _build_ll_tokenizer(tokenizer)
            _ll_tokenizers[tokenizer] = ll
        return ll


def _build_ll_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    try:  # the usual case: byte-level BPE or byte fallback, read from tokenizer.json in Rust
        return llguidance.hf.from_tokenizer(tokenizer)
    except ValueError:  # a decoder llguidance does not know: take each token's decoded text
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_DecodedVocab(tokenizer)))


class _DecodedVocab:
    """A tokenizer as llguidance.TokenizerWrapper wants it: each token's bytes (special tokens
    marked with a leading 0xff), and an encode function. Holds the tokenizer weakly, so that the
    cache entry does not keep its own key alive."""

    def __init__(self, tokenizer):
        special = set(tokenizer.all_special_ids)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(special)
        self.tokens = [
            (b"\xff" if i in special else b"") + tokenizer.decode([i]).encode() for i in range(len(tokenizer))
        ]
        self._tokenizer = weakref.ref(tokenizer)

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer().encode(text, add_special_tokens=False)


class _Digits:
    """Which tokens are digits, per tokenizer: a run of digits longer than a float can hold is
    cut (MAX_DIGIT_RUN), since a JSON number's grammar lets a model write digits forever."""

    def __init__(self, tokenizer):
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.all_digits = [bool(t) and t.isascii() and t.isdigit() for t in texts]
        self.tail = [len(t) - len(t.rstrip("0123456789")) for t in texts]
        starts = 0
        for i, t in enumerate(texts):
            if t[:1].isascii() and t[:1].isdigit():
                starts |= 1 << i
        self.starts = starts  # bit i: token i begins with a digit (it would lengthen a run)


_digits: "weakref.WeakKeyDictionary[object, _Digits]" = weakref.WeakKeyDictionary()

MAX_DIGIT_RUN = 16  # digits in a row; past that only a token that is no digit may follow, if any


def _digits_of(tokenizer) -> _Digits:
    with _ll_tokenizers_lock:
        d = _digits.get(tokenizer)
        if d is None:
            d = _digits[tokenizer] = _Digits(tokenizer)
        return d


# --- the matcher


def mask_bytes(vocab_size: int) -> int:
    """The length of a mask over `vocab_size` tokens: whole int32 words."""
    return 4 * ((vocab_size + 31) // 32)


class Matcher:
    """Which tokens may come next in one sequence under `grammar`. Not thread-safe: one per
    sequence, driven by one task."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerFast, grammar: str, stop_ids: frozenset[int], vocab_size: int
    ):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if not stop_ids or not all(0 <= t < vocab_size for t in stop_ids):
            raise ValueError(f"stop_ids must be ids below vocab_size={vocab_size}, got {sorted(stop_ids)}")
        ll = ll_tokenizer(tokenizer)
        self._m = llguidance.LLMatcher(ll, grammar, log_level=0)
        if self._m.is_error():
            log.warning("grammar refused: %s", self._m.get_error())
            raise GrammarError(f"grammar refused: {self._m.get_error().splitlines()[0][:200]}")
        self.label = _label(grammar)
        self.stop_ids = frozenset(stop_ids)
        self.vocab_size = vocab_size
        self._known = min(ll.vocab_size, vocab_size)  # ids both the tokenizer and the model have
        # the engine's own end-of-sequence ids: they stop a sequence only as one of stop_ids
        self._ll_eos = frozenset(ll.eos_tokens) - self.stop_ids
        self._stopped = False  # a stop id was consumed
        self._digits = _digits_of(tokenizer)
        self._run = 0  # digits at the end of the text so far

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but a stop id may follow."""
        return self._stopped or self._m.is_stopped()

    def mask(self) -> bytes:
        """The tokens allowed next, as a packed bitmask of mask_bytes(vocab_size) bytes."""
        size = mask_bytes(self.vocab_size)
        if self.finished:
            buf = bytearray(size)
            accepting = True
        else:
            buf = bytearray(self._m.compute_bitmask())
            if self._m.is_error():
                raise self._failed("allows no token here: nothing can continue the output")
            accepting = self._m.is_accepting()
            # llguidance's mask has a word to spare; cut it at the last token both know
            del buf[(self._known + 7) // 8 :]
            if self._known % 8:
                buf[-1] &= (1 << (self._known % 8)) - 1
            buf.extend(bytes(size - len(buf)))  # padding ids: never allowed
            for t in self._ll_eos:
                if t < self.vocab_size:
                    buf[t >> 3] &= ~(1 << (t & 7)) & 0xFF
        for t in self.stop_ids:
            if accepting:
                buf[t >> 3] |= 1 << (t & 7)
            else:
                buf[t >> 3] &= ~(1 << (t & 7)) & 0xFF
        if self._run >= MAX_DIGIT_RUN:  # end the number if the grammar lets it end here
            cut = int.from_bytes(buf, "little") & ~self._digits.starts
            if cut:
                return cut.to_bytes(len(buf), "little")
        return bytes(buf)

    def _after(self, run: int, token: int) -> int:
        """The digit run once `token` follows a run of `run` digits."""
        d = self._digits
        if not 0 <= token < len(d.tail):
            return 0
        return run + d.tail[token] if d.all_digits[token] else d.tail[token]

    def consume(self, token: int) -> None:
        """Advance past `token`; a token the grammar forbids raises GrammarError (and leaves the
        matcher as it was)."""
        if token in self.stop_ids:
            if not (self.finished or self._m.is_accepting()):
                raise GrammarError(
                    f"the {self.label} does not allow stop token {token} before it is complete"
                )
            self._stopped = True
        elif self.finished:
            raise GrammarError(f"the {self.label} is complete: only a stop id may follow, not token {token}")
        elif not 0 <= token < self._known or token in self._ll_eos:
            raise GrammarError(f"the {self.label} does not allow token {token}")
        elif self._m.validate_tokens([token]) != 1:
            raise GrammarError(f"the {self.label} does not allow token {token} here")
        elif not self._m.consume_token(token):
            raise self._failed(f"failed on token {token}")
        else:
            self._run = self._after(self._run, token)

    def _failed(self, what: str) -> GrammarError:
        """The engine's failure as a GrammarError naming the grammar (its internals are logged)."""
        log.warning("the %s %s: %s", self.label, what, self._m.get_error())
        return GrammarError(f"the {self.label} {what}")

    def draft_masks(self, tokens: list[int]) -> list[bytes]:
        """With k = how many leading `tokens` the grammar accepts in sequence, the k + 1 masks
        before tokens[0], after tokens[:1], ..., after tokens[:k]. The matcher is left as it was."""
        stopped, run, consumed = self._stopped, self._run, 0
        masks = [self.mask()]
        try:
            for t in tokens:
                m = masks[-1]
                if not (0 <= t < self.vocab_size and m[t >> 3] >> (t & 7) & 1):
                    break
                if t in self.stop_ids:
                    self._stopped = True
                elif not self._m.consume_token(t):
                    raise self._failed(f"failed on draft token {t}")
                else:
                    consumed += 1
                    self._run = self._after(self._run, t)
                masks.append(self.mask())
        finally:
            self._stopped, self._run = stopped, run
            if consumed and not self._m.rollback(consumed):
                raise self._failed("could not take back the draft tokens")
        return masks


# --- applying and shipping masks


def apply_mask(logits: torch.Tensor, mask: bytes) -> None:
    """Set the logits [V] of the tokens `mask` forbids to -inf, in place."""
    (vocab,) = logits.shape
    if len(mask) != mask_bytes(vocab):
        raise ValueError(f"a mask over {vocab} tokens has {mask_bytes(vocab)} bytes, got {len(mask)}")
    logits.masked_fill_(~allowed(mask, vocab).to(logits.device), float("-inf"))


def pack_mask(mask: bytes) -> str:
    """A mask as ASCII for a JSON header: zlib, then base64."""
    return base64.b64encode(zlib.compress(mask, 6)).decode("ascii")


def unpack_mask(text: str, vocab_size: int) -> bytes:
    """The mask `pack_mask` packed, checked against `vocab_size`; a malformed one (from a broken
    or hostile peer) raises ValueError saying what is wrong. Decompression is bounded."""
    size = mask_bytes(vocab_size)
    if not isinstance(text, str):
        raise ValueError(f"a packed mask is a string, got {type(text).__name__}")
    limit = 2 * size + 256  # zlib at its worst adds a few bytes per 16 KiB; base64 a third
    if len(text) > limit:
        raise ValueError(f"packed mask of {len(text)} characters, more than {limit} for {vocab_size} tokens")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("packed mask is not base64") from None
    d = zlib.decompressobj()
    try:
        mask = d.decompress(raw, size + 1)
    except zlib.error as e:
        raise ValueError(f"packed mask is not zlib data: {e}") from None
    if len(mask) != size:
        got = f"{len(mask)} bytes" if len(mask) < size else f"more than {size} bytes"
        raise ValueError(f"a mask over {vocab_size} tokens has {size} bytes, got {got}")
    if d.unconsumed_tail or d.unused_data:
        raise ValueError("packed mask has trailing data after its zlib stream")
    if not d.eof:
        raise ValueError("packed mask's zlib stream is truncated")
    past = 8 * size - vocab_size  # bits after the last token
    if past and int.from_bytes(mask[-4:], "little") >> (32 - past):
        raise ValueError(f"mask allows ids at or past vocab_size={vocab_size}")
    if not any(mask):
        raise ValueError("mask allows no token")
    return mask
