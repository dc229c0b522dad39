"""Constrained decoding (inference/grammar.py): random walks under each grammar end in text that
parses and validates; masks, stop ids and drafts behave as documented (the mask's transport form
is tests/inference/test_grammar_masks.py)."""

import json
import random
import threading

import jsonschema
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from inference.grammar import (
    GrammarError,
    Matcher,
    apply_mask,
    json_object_grammar,
    json_schema_grammar,
    ll_tokenizer,
    mask_bytes,
    pack_mask,
    parse_tool_calls,
    tool_call_grammar,
    unpack_mask,
)
from tests.helpers import _byte_tokenizer

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": -5, "maximum": 5},
                "minItems": 1,
                "maxItems": 4,
            },
        },
        "required": ["tags", "scores"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": [1, 2, "xl", None]},
        },
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "note": {"type": "string", "maxLength": 6},
            "done": {"type": "boolean"},
        },
        "required": ["id"],
        "additionalProperties": False,
    },
    "anyof": {
        "type": "object",
        "properties": {
            "value": {
                "anyOf": [
                    {"type": "integer", "minimum": 10, "maximum": 20},
                    {"type": "string", "maxLength": 4},
                    {
                        "type": "object",
                        "properties": {"x": {"type": "boolean"}},
                        "required": ["x"],
                        "additionalProperties": False,
                    },
                ]
            }
        },
        "required": ["value"],
        "additionalProperties": False,
    },
    "top_array": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 5},
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city {today}.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "unit": {"enum": ["C", "F"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 9},
                    "b": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},  # no parameters: arguments {}
]
PARAMS = {
    t["function"]["name"]: t["function"].get("parameters", {"type": "object", "additionalProperties": False})
    for t in TOOLS
}


@pytest.fixture(scope="module")
def byte_tok():
    return _byte_tokenizer(256)  # eos </s> = 2; no "\n" in its vocabulary


@pytest.fixture(scope="module")
def smol_tok(default_model):
    return AutoTokenizer.from_pretrained(default_model)  # 49152 tokens; <|endoftext|> 0, <|im_end|> 2


def smol_matcher(tok, grammar: str) -> Matcher:
    return Matcher(tok, grammar, frozenset({0, 2}), 49152)


def allowed(mask: bytes) -> list[int]:
    return np.flatnonzero(np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little")).tolist()


def walk(matcher: Matcher, tok, seed: int, max_tokens: int = 400, explore: int = 120) -> str:
    """Random tokens among those allowed (a stop id half the time it is allowed); after `explore`
    steps, closing tokens first, so that the walk ends. The text generated, stop id excluded."""
    rng = random.Random(seed)
    closers = [
        ids[0]
        for s in ('"', "}", "]", "0", ",", " ")
        if len(ids := tok.encode(s, add_special_tokens=False)) == 1
    ]
    out: list[int] = []
    for step in range(max_tokens):
        ids = allowed(matcher.mask())
        assert ids, f"empty mask after {tok.decode(out)!r}"
        stops = [t for t in ids if t in matcher.stop_ids]
        if stops and (step >= explore or rng.random() < 0.5):
            token = rng.choice(stops)
        elif step >= explore and (close := [t for t in closers if t in set(ids)]):
            token = close[0]
        else:
            token = rng.choice(ids)
        matcher.consume(token)
        if token in matcher.stop_ids:
            assert matcher.finished
            return tok.decode(out)
        out.append(token)
    raise AssertionError(f"no stop within {max_tokens} tokens: {tok.decode(out)!r}")


def test_json_object_walks_parse(byte_tok, smol_tok):
    for seed in range(6):
        text = walk(Matcher(byte_tok, json_object_grammar(), frozenset({2}), 256), byte_tok, seed)
        assert isinstance(json.loads(text), dict), text
        text = walk(smol_matcher(smol_tok, json_object_grammar()), smol_tok, seed)
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_walks_validate(smol_tok, name):
    grammar = json_schema_grammar(SCHEMAS[name])
    texts = set()
    for seed in range(5):
        text = walk(smol_matcher(smol_tok, grammar), smol_tok, seed)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
        texts.add(text)
    assert len(texts) > 1, texts  # the walks explore


def test_json_schema_walks_on_byte_tokenizer(byte_tok):
    for name in ("nested", "enum"):
        for seed in range(3):
            text = walk(
                Matcher(byte_tok, json_schema_grammar(SCHEMAS[name]), frozenset({2}), 256), byte_tok, seed
            )
            jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.parametrize(
    ("name", "parallel"), [(None, True), (None, False), ("get_weather", True), ("add", False)]
)
def test_tool_call_walks_parse(smol_tok, name, parallel):
    grammar = tool_call_grammar(TOOLS, name=name, parallel=parallel)
    counts = set()
    for seed in range(16):  # after a call, "\n" is one of three choices: a few walks go on
        text = walk(smol_matcher(smol_tok, grammar), smol_tok, seed)
        rest, calls = parse_tool_calls(text)
        assert rest == "" and calls, text
        assert text.startswith('<tool_call>\n{"name": "') and text.endswith("}\n</tool_call>"), text
        for call in calls:
            assert name is None or call["name"] == name
            jsonschema.validate(call["arguments"], PARAMS[call["name"]])
        counts.add(len(calls))
    assert max(counts) > 1 if parallel else counts == {1}


def test_exact_tool_call_text_is_accepted(smol_tok):
    text = (
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    )
    m = smol_matcher(smol_tok, tool_call_grammar(TOOLS))
    for t in smol_tok.encode(text, add_special_tokens=False):
        m.consume(t)
    m.consume(2)
    assert m.finished
    single = smol_matcher(smol_tok, tool_call_grammar(TOOLS, parallel=False))
    ids = smol_tok.encode(text, add_special_tokens=False)
    first = len(smol_tok.encode(text.split("\n<tool_call>")[0], add_special_tokens=False))
    for t in ids[:first]:
        single.consume(t)
    assert single.finished  # one call and nothing after it


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "objekt"},
        {"type": "string", "format": "no-such-format"},
        {"type": "string", "pattern": "(?=a)b"},
        {"$ref": "#/$defs/missing"},
        {"type": "integer", "minimum": 5, "maximum": 2},
        ["not", "an", "object"],
    ],
)
def test_bad_schema_raises(schema):
    with pytest.raises(GrammarError):
        json_schema_grammar(schema)


def test_bad_tools_raise():
    bad_params = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]
    with pytest.raises(GrammarError, match="tool 'f'"):
        tool_call_grammar(bad_params)
    with pytest.raises(GrammarError, match="'nope'"):
        tool_call_grammar(TOOLS, name="nope")
    with pytest.raises(GrammarError, match="two tools named 'add'"):
        tool_call_grammar([TOOLS[1], TOOLS[1]])
    for tools in ([], [{"type": "function"}], [{"type": "retrieval", "function": {"name": "x"}}], "tools"):
        with pytest.raises(GrammarError):
            tool_call_grammar(tools)


def test_matcher_refuses_bad_arguments(byte_tok):
    with pytest.raises(GrammarError, match="grammar refused"):
        Matcher(byte_tok, "start: no_such_rule", frozenset({2}), 256)
    with pytest.raises(ValueError, match="stop_ids"):
        Matcher(byte_tok, json_object_grammar(), frozenset({256}), 256)
    with pytest.raises(ValueError, match="vocab_size"):
        Matcher(byte_tok, json_object_grammar(), frozenset({2}), 0)


def test_consume_forbidden_raises_and_keeps_state(smol_tok):
    m = smol_matcher(smol_tok, json_schema_grammar(SCHEMAS["enum"]))
    before = m.mask()
    bad = smol_tok.encode("x", add_special_tokens=False)[0]
    for token in (bad, 0, 2, 49151 + 1, -1):  # a letter, stop ids before the end, out of range
        with pytest.raises(GrammarError):
            m.consume(token)
    assert m.mask() == before and not m.finished
    for t in smol_tok.encode('{"color": "red", "size": 2}', add_special_tokens=False):
        m.consume(t)
    with pytest.raises(GrammarError, match="complete"):
        m.consume(bad)


def test_stop_ids_allowed_exactly_at_end(byte_tok):
    vocab_size = 300  # past the tokenizer's 256: padding ids
    m = Matcher(
        byte_tok,
        json_schema_grammar({"type": "integer", "minimum": 0, "maximum": 99}),
        frozenset({2, 0}),
        vocab_size,
    )
    assert len(m.mask()) == mask_bytes(vocab_size) == 40
    digit = byte_tok.convert_tokens_to_ids
    with pytest.raises(GrammarError):
        m.consume(280)  # a padding id
    steps = [("", False, False), ("4", True, False), ("42", True, True)]
    for i, (text, accepting, finished) in enumerate(steps):
        if i:
            m.consume(digit(text[-1]))
        ids = set(allowed(m.mask()))
        assert ({0, 2} <= ids) == accepting and not ({0, 2} & ids and not accepting), (text, ids)
        assert m.finished == finished
        assert all(t < 256 for t in ids)
        if finished:
            assert ids == {0, 2}
    m.consume(0)
    assert m.finished and set(allowed(m.mask())) == {0, 2}


def test_draft_masks_equal_stepwise_masks(smol_tok):
    grammar = json_schema_grammar(SCHEMAS["optional"])
    good = smol_tok.encode('{"id": 7, "note": "hi"}', add_special_tokens=False) + [2]
    m = smol_matcher(smol_tok, grammar)
    m.consume(good[0])
    state = m.mask()
    drafts = m.draft_masks(good[1:])
    assert m.mask() == state and not m.finished  # unchanged
    stepwise = smol_matcher(smol_tok, grammar)
    stepwise.consume(good[0])
    expected = [stepwise.mask()]
    for t in good[1:]:
        stepwise.consume(t)
        expected.append(stepwise.mask())
    assert drafts == expected and len(drafts) == len(good)
    # a forbidden token at position 3 stops the draft there: k = 3, four masks
    bad = smol_tok.encode("x", add_special_tokens=False)[0]
    assert m.draft_masks([*good[1:4], bad, *good[4:]]) == expected[:4]
    assert m.draft_masks([]) == [state] and m.draft_masks([bad]) == [state]
    for t in good[1:]:  # the matcher still follows the real sequence
        m.consume(t)
    assert m.finished


def test_apply_mask_matches_matcher(smol_tok):
    m = smol_matcher(smol_tok, json_schema_grammar(SCHEMAS["enum"]))
    for t in smol_tok.encode('{"color": "', add_special_tokens=False):
        m.consume(t)
    logits = torch.zeros(49152)
    apply_mask(logits, unpack_mask(pack_mask(m.mask()), 49152))
    ok = torch.isfinite(logits).nonzero().flatten().tolist()
    assert ok == allowed(m.mask()) and {smol_tok.decode([t])[:1] for t in ok} == {"r", "g", "b"}


def test_parse_tool_calls():
    text = (
        'Let me check.\n <tool_call>\n  {"name": "add", "arguments": {"a": 1}}  \n</tool_call>\n'
        '<tool_call>{"name": "now", "arguments": "{}"}</tool_call>\n'
        "<tool_call>\n{not json}\n</tool_call>\n"
        '<tool_call>\n{"arguments": {}}\n</tool_call> done '
    )
    rest, calls = parse_tool_calls(text)
    assert calls == [{"name": "add", "arguments": {"a": 1}}, {"name": "now", "arguments": {}}]
    assert rest.startswith("Let me check.") and "{not json}" in rest and '{"arguments": {}}' in rest
    assert rest.endswith("</tool_call> done") and '"add"' not in rest
    assert parse_tool_calls("  plain text \n") == ("plain text", [])
    assert parse_tool_calls('<tool_call>\n{"name": "x", "arguments": {}}') == (
        '<tool_call>\n{"name": "x", "arguments": {}}',
        [],
    )


def test_tokenizer_cache_is_shared_across_threads(byte_tok):
    tok = _byte_tokenizer(256)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ll_tokenizer(tok))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert ll_tokenizer(byte_tok) is not results[0]  # one per tokenizer object


def test_a_number_cannot_grow_digits_forever(smol_tok):
    """A walk that always writes another digit when one is allowed (as a small model may): the
    number ends after MAX_DIGIT_RUN digits, where the grammar lets it end, and the text validates."""
    from inference.grammar import MAX_DIGIT_RUN

    schema = {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": 9, "maximum": 360}, "n": {"type": "integer"}},
        "required": ["x", "n"],
        "additionalProperties": False,
    }
    matcher = smol_matcher(smol_tok, json_schema_grammar(schema))
    digits = [smol_tok.convert_tokens_to_ids(d) for d in "0123456789"]
    dot = smol_tok.convert_tokens_to_ids(".")
    out: list[int] = []
    for _ in range(200):
        ids = set(allowed(matcher.mask()))
        prefer = [t for t in (*digits, dot) if t in ids]
        stops = [t for t in ids if t in matcher.stop_ids]
        token = prefer[len(out) % len(prefer)] if prefer else (stops[0] if stops else min(ids))
        matcher.consume(token)
        if token in matcher.stop_ids:
            break
        out.append(token)
    text = smol_tok.decode(out)
    value = json.loads(text)
    jsonschema.validate(value, schema)
    assert all(len(run) <= MAX_DIGIT_RUN for run in "".join(c if c.isdigit() else " " for c in text).split())
