"""Grammars in the forms requests bring them (vLLM's structured outputs, llama.cpp's grammar): a
regular expression, a list of choices, a GBNF or Lark grammar. Each is compiled and started by the
engine here, so that a bad one is a GrammarError now, never mid-generation nor a crash."""

import json

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from .grammar import GrammarError, check_grammar, check_start

MAX_CHOICES = 1024


def regex_grammar(pattern: str) -> str:
    """Text that matches `pattern` whole (Rust's regex syntax, as llguidance reads it)."""
    if not isinstance(pattern, str) or not pattern:
        raise GrammarError("a regex must be a non-empty string")
    return _checked(llguidance.LLMatcher.grammar_from_regex(pattern), "regex")


def choice_grammar(choices: list[str]) -> str:
    """Exactly one of `choices`."""
    if not isinstance(choices, list) or not 0 < len(choices) <= MAX_CHOICES:
        raise GrammarError(f"choice must be a list of 1 to {MAX_CHOICES} strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("each choice must be a non-empty string")
    lark = "start: " + " | ".join(json.dumps(c) for c in choices)
    return _checked(llguidance.LLMatcher.grammar_from_lark(lark), "choice")


def gbnf_grammar(text: str) -> str:
    """A grammar as llama.cpp writes it (GBNF: `root ::= ...`), or as Lark (`start: ...`, the
    syntax llguidance reads; vLLM's guidance backend takes it too)."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("a grammar must be a non-empty string")
    try:
        lark = any_to_lark(text)
    except Exception as e:  # (the converter raises plain Exceptions too: "Rule 'x' not found")
        raise GrammarError(f"invalid grammar: {str(e).splitlines()[0][:200]}") from None
    return _checked(llguidance.LLMatcher.grammar_from_lark(lark), "grammar")


def _checked(grammar: str, what: str) -> str:
    check_grammar(grammar, what)
    check_start(grammar, what)
    return grammar
