"""JSON schemas the grammar engine would accept and then fail on (inference/schema_refs.py): a
$ref loop with no finite value is refused at compile time naming the $ref, recursive schemas
with finite values still compile and walk to valid JSON, a chain of $refs too deep for the
engine's stack is refused instead of crashing the process, and an engine failure mid-generation
says which grammar failed without the engine's internal state."""

import json
import re
import subprocess
import sys

import jsonschema
import llguidance
import pytest

from inference.grammar import GrammarError, Matcher, json_schema_grammar
from inference.schema_refs import MAX_SCHEMA_LEVELS, levels
from tests.helpers import _byte_tokenizer
from tests.inference.test_grammar import walk

LOOPS = {
    "itself": ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}, "#/$defs/a"),
    "two": (
        {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}}},
        "#/$defs/a",
    ),
    "any_of": ({"$ref": "#/$defs/a", "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}]}}}, "#/$defs/a"),
    "required": ({"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}, "#"),
    "items": ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, "#"),
    # the root has a finite value (without x), but a model that writes "x" meets the loop
    "optional": (
        {
            "type": "object",
            "properties": {"x": {"$ref": "#/$defs/a"}, "y": {"type": "integer"}},
            "additionalProperties": False,
            "$defs": {"a": {"$ref": "#/$defs/a"}},
        },
        "#/$defs/a",
    ),
}
RECURSIVE = {
    "list": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer", "minimum": 0, "maximum": 9},
                    "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
                },
                "required": ["v", "next"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    "tree": {
        "type": "object",
        "properties": {"kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}},
        "additionalProperties": False,
    },
    "optional_self": {"type": "object", "properties": {"x": {"$ref": "#"}}, "additionalProperties": False},
}


def chain(n: int) -> dict:
    """A schema whose $refs lead through n definitions to an integer."""
    defs = {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(n)}
    return {"$ref": "#/$defs/a0", "$defs": {**defs, f"a{n}": {"type": "integer"}}}


@pytest.mark.parametrize("name", LOOPS)
def test_a_ref_loop_is_refused_at_compile_time_naming_the_ref(name):
    schema, ref = LOOPS[name]
    with pytest.raises(GrammarError, match=re.escape(f"$ref '{ref}' loops back into itself")):
        json_schema_grammar(schema)


@pytest.mark.parametrize("name", RECURSIVE)
def test_recursive_schemas_with_finite_values_compile_and_walk(name):
    tok = _byte_tokenizer(256)
    grammar = json_schema_grammar(RECURSIVE[name])
    for seed in range(3):
        text = walk(Matcher(tok, grammar, frozenset({2}), 256), tok, seed)
        jsonschema.validate(json.loads(text), RECURSIVE[name])


def test_levels_count_a_loop_once():
    assert levels(RECURSIVE["tree"]) == 3  # the root, kids, its items: a loop through "#"
    assert levels(chain(10)) == 12  # the root, a0 ... a10


def test_a_ref_chain_too_deep_for_the_engine_is_refused_not_a_crash():
    """~1,200 levels of $refs crash the engine's compiler (a stack overflow: the whole peer
    process). Run in a child, so that a crash fails this test instead of ending the run."""
    code = (
        "from inference.grammar import GrammarError, json_schema_grammar\n"
        f"schema = {chain(3000)!r}\n"
        "try:\n"
        "    json_schema_grammar(schema)\n"
        "except GrammarError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert f"3002 levels deep; the limit is {MAX_SCHEMA_LEVELS}" in done.stdout, done.stdout
    json_schema_grammar(chain(MAX_SCHEMA_LEVELS - 2))  # at the limit: taken


def test_an_engine_failure_mid_generation_names_the_grammar_not_its_state():
    """A loop that got past the checks (built by the engine directly) fails at its first mask:
    the error says which grammar failed and nothing of the engine's state."""
    schema, _ = LOOPS["itself"]
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    matcher = Matcher(_byte_tokenizer(256), grammar, frozenset({2}), 256)
    with pytest.raises(GrammarError) as failed:
        matcher.mask()
    message = str(failed.value)
    assert message.startswith("the JSON schema allows no token here"), message
    for internal in ("<state>", "NoExtensionBias", "Parser", "grammars"):
        assert internal not in message, message


PYDANTIC_STYLE = {  # a tool's parameters as pydantic writes them: models under $defs
    "type": "object",
    "properties": {"where": {"$ref": "#/$defs/Place"}, "when": {"$ref": "#/$defs/Day"}},
    "required": ["where", "when"],
    "additionalProperties": False,
    "$defs": {
        "Place": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "Day": {"enum": ["mon", "tue"]},
    },
}


def test_a_tools_own_refs_resolve_inside_the_tool_call_grammar(default_model):
    """Each tool's parameters sit inside the one grammar of all calls: their "#/$defs/..." must
    still reach their own definitions (they were refused, with the engine's grammar dump)."""
    from transformers import AutoTokenizer

    from inference.grammar import parse_tool_calls, tool_call_grammar

    tools = [{"type": "function", "function": {"name": "meet", "parameters": PYDANTIC_STYLE}}]
    tools.append({"type": "function", "function": {"name": "noop"}})
    tok = AutoTokenizer.from_pretrained(default_model)
    grammar = tool_call_grammar(tools, parallel=False)
    for seed in range(4):
        text = walk(Matcher(tok, grammar, frozenset({0, 2}), 49152), tok, seed)
        _, (call,) = parse_tool_calls(text)
        if call["name"] == "meet":
            jsonschema.validate(call["arguments"], PYDANTIC_STYLE)
    bad = {**PYDANTIC_STYLE, "properties": {"where": {"$ref": "#/$defs/Nowhere"}}}
    with pytest.raises(GrammarError) as refused:
        tool_call_grammar([{"type": "function", "function": {"name": "meet", "parameters": bad}}])
    assert "\n" not in str(refused.value) and "Nowhere" in str(refused.value), refused.value
