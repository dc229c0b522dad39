"""Reasoning models' thinking without a swarm: the parsers on text that arrives piece by piece
(tags split anywhere, a missing end tag, harmony channels and calls), the format read off chat
templates and vocabularies, where a prompt leaves the output, the stop tokens of generation
configs, and a run's deltas, whole messages and streamed chunks that carry the thought apart."""

import asyncio
import json

import pytest
from transformers import AutoTokenizer, GenerationConfig

import peers.api.runs
from inference import Tokenizer
from peers.api.events import Delta, Finish
from peers.api.reasoning import (
    HARMONY_MARKERS,
    HarmonyParser,
    Reasoning,
    ReasoningStart,
    ThinkParser,
    reasoning_of,
)
from peers.api.runs import Run, RunSpec, collect
from peers.api.schema import Tool
from peers.api.shapes import Choice, Shape
from peers.api.sse import Chunks
from peers.entry.generation import Token
from peers.transport.frames import Sampling
from tests.peers.api.fakes import node

HARMONY_SPECIALS = list(HARMONY_MARKERS)  # GPT-OSS's vocabulary has them as special tokens
HARMONY_TEMPLATE = (
    "{% if reasoning_effort is defined %}<|start|>system<|message|>Reasoning: {{ reasoning_effort }}<|end|>{% endif %}"
    "{% for m in messages %}<|start|>{{ m.role }}{% if m.role == 'assistant' %}<|channel|>final{% endif %}"
    "<|message|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}"
)
ADD = Tool.model_validate({"type": "function", "function": {"name": "add"}})


def split(parser, pieces) -> tuple[str, str]:
    """(reasoning, content) of `pieces` pushed one by one, then the parser's finish."""
    reasoning = content = ""
    for piece in [*pieces, None]:
        r, c = parser.finish() if piece is None else parser.push(piece)
        reasoning, content = reasoning + r, content + c
    return reasoning, content


def chars(text: str) -> list[str]:
    return list(text)


@pytest.mark.parametrize("pieces", [chars, lambda t: [t], lambda t: [t[:9], t[9:20], t[20:]]])
def test_think_tags_split_anywhere(pieces):
    text = "\n<think>\nThe user asks. Easy.\n</think>\n\nBerlin <think> is text"
    assert split(ThinkParser(inside=False), pieces(text)) == (
        "\nThe user asks. Easy.\n",
        "Berlin <think> is text",
    )
    inside = "Let me see.</think>Paris"
    assert split(ThinkParser(inside=True), pieces(inside)) == ("Let me see.", "Paris")


def test_think_tags_missing_end_and_no_thinking():
    assert split(ThinkParser(inside=True), chars("all thought </thi")) == ("all thought </thi", "")
    assert split(ThinkParser(inside=False), chars("<think>cut off")) == ("cut off", "")
    assert split(ThinkParser(inside=False), chars("Just an answer.")) == ("", "Just an answer.")
    assert split(ThinkParser(inside=False), chars("  <thin")) == ("", "  <thin")
    parser = ThinkParser(inside=True)  # nothing goes out while a tag may be arriving
    assert parser.push("a</th") == ("a", "") and parser.push("ink>") == ("", "")
    assert parser.push("\n\n") == ("", "") and parser.push("b") == ("", "b")


@pytest.mark.parametrize("pieces", [chars, lambda t: [t]])
def test_harmony_channels(pieces):
    text = (
        "<|channel|>analysis<|message|>User wants 2+2.<|end|><|start|>assistant<|channel|>final<|message|>4"
    )
    assert split(HarmonyParser(None), pieces(text)) == ("User wants 2+2.", "4")
    call = '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 1}'
    reasoning, content = split(
        HarmonyParser(None), pieces("<|channel|>analysis<|message|>Use add.<|end|><|start|>assistant" + call)
    )
    assert reasoning == "Use add."
    assert content == '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    assert split(HarmonyParser(None), pieces('{"a": 1}')) == ("", '{"a": 1}')  # no header: plain text
    assert split(HarmonyParser("<|channel|>analysis"), pieces("still thinking<|en")) == (
        "still thinking<|en",
        "",
    )


def test_where_the_prompt_leaves_the_output():
    think = Reasoning("think", frozenset())
    assert think.start("<|im_start|>assistant\n<think>\n") == ReasoningStart("think", True)
    assert not think.start("assistant\n<think>\n\n</think>\n\n").inside
    assert not think.start("<|im_start|>assistant\n").inside
    # a user who writes "<think>" opens nothing: only a generation prompt ending in it does
    assert not think.start(
        "<|im_start|>user\nWhy print <think> first?<|im_end|>\n<|im_start|>assistant\n"
    ).inside
    harmony = Reasoning("harmony", frozenset())
    assert harmony.start("<|end|><|start|>assistant") == ReasoningStart("harmony", False)
    opened = harmony.start("<|start|>assistant<|channel|>analysis<|message|>")
    assert opened.inside and opened.header == "<|start|>assistant<|channel|>analysis"


@pytest.fixture
def harmony_model(tiny_llama, tmp_path):
    """The tiny Llama's tokenizer with GPT-OSS's markers as special tokens, a harmony template,
    and a generation config whose eos list holds <|return|> and <|call|>."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_special_tokens({"additional_special_tokens": HARMONY_SPECIALS})
    tok.chat_template = HARMONY_TEMPLATE
    tok.save_pretrained(tmp_path)
    ids = tok.convert_tokens_to_ids(["<|return|>", "<|call|>"])
    GenerationConfig(eos_token_id=ids).save_pretrained(tmp_path)
    return tmp_path


def test_stop_tokens_come_from_the_generation_config(harmony_model, tiny_llama, tmp_path):
    tok = Tokenizer(harmony_model)
    ret, call = tok.vocab_ids("<|return|>", "<|call|>").values()
    assert tok.eos_token_ids == {2, ret, call}  # the tokenizer's </s>, and the config's list
    qwen = tmp_path / "qwen"
    hf = AutoTokenizer.from_pretrained(tiny_llama)
    hf.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|endoftext|>"]})
    hf.save_pretrained(qwen)
    ends = hf.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    GenerationConfig(eos_token_id=ends).save_pretrained(qwen)
    assert Tokenizer(qwen).eos_token_ids == set(ends)


def test_the_format_is_read_off_the_template_and_vocabulary(harmony_model, tiny_llama):
    harmony = reasoning_of(Tokenizer(harmony_model))
    assert harmony is not None and harmony.format == "harmony" and len(harmony.keep) == len(HARMONY_SPECIALS)
    assert "reasoning_effort" in Tokenizer(harmony_model).template_variables
    assert (
        reasoning_of(Tokenizer(tiny_llama, chat_template=HARMONY_TEMPLATE)) is None
    )  # no markers in the vocabulary
    think = reasoning_of(Tokenizer(tiny_llama, chat_template=THINK_TEMPLATE))
    assert think == Reasoning("think", frozenset())  # the tags are plain text to this vocabulary
    assert reasoning_of(Tokenizer(tiny_llama)) is None
    assert Tokenizer(tiny_llama, chat_template=THINK_TEMPLATE).template_variables == {
        "messages",
        "add_generation_prompt",
        "enable_thinking",
    }


def run_tokens(monkeypatch, tok: Tokenizer, ids: list[int], start: ReasoningStart, keep) -> list:
    async def generate(node, prompt_ids, max_tokens, sampling, stop_ids, n, **kw):
        for t in ids:
            yield [Token(t, -0.5)]

    monkeypatch.setattr(peers.api.runs, "generate", generate)
    spec = RunSpec(
        prompt_ids=[65],
        max_tokens=len(ids),
        sampling=Sampling(),
        stops=[],
        stop_ids=tok.eos_token_ids,
        n=1,
        reasoning=start,
        keep=keep,
    )
    run = Run(node(tokenizer=tok), spec)

    async def events():
        return [e async for e in run.events()]

    return asyncio.run(events())


def test_a_harmony_run_gives_thought_and_answer_apart(monkeypatch, harmony_model):
    tok = Tokenizer(harmony_model)
    reasoning = reasoning_of(tok)
    prompt = tok.encode_chat([{"role": "user", "content": "2+2?"}])
    start = reasoning.start(tok.decode(prompt, reasoning.keep))
    assert start == ReasoningStart("harmony", False)
    text = "<|channel|>analysis<|message|>Add.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>more"
    ids = tok.hf.encode(text, add_special_tokens=False)
    events = run_tokens(monkeypatch, tok, ids, start, reasoning.keep)
    assert events[-2] == Finish(0, "stop", (tok.vocab_ids("<|return|>")["<|return|>"],))  # it ended it
    choice = asyncio.run(collect(_aiter(events), 1))[0]
    message = Shape("r", "m", True, tok, None, [], reasoning=True).whole([choice], {})["choices"][0][
        "message"
    ]
    assert message == {"role": "assistant", "content": "4", "reasoning_content": "Add."}

    call = '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 1}<|call|>'
    events = run_tokens(
        monkeypatch, tok, tok.hf.encode(call, add_special_tokens=False), start, reasoning.keep
    )
    choice = asyncio.run(collect(_aiter(events), 1))[0]
    shaped = Shape("r", "m", True, tok, None, [ADD], reasoning=True).whole([choice], {})["choices"][0]
    assert shaped["finish_reason"] == "tool_calls" and shaped["message"]["content"] is None
    assert shaped["message"]["reasoning_content"] is None
    assert json.loads(shaped["message"]["tool_calls"][0]["function"]["arguments"]) == {"a": 1}


async def _aiter(items):
    for item in items:
        yield item


def test_chunks_carry_the_thought_apart_and_only_for_thinking_models():
    tokenizer = node().tokenizer
    thinking = Chunks(Shape("r", "m", True, tokenizer, None, [], reasoning=True), 1, [])
    deltas = [c["choices"][0]["delta"] for c in thinking.of(Delta(0, "", (), "hmm"))]
    deltas += [c["choices"][0]["delta"] for c in thinking.of(Delta(0, "Hi", (), "!"))]
    assert deltas == [{"reasoning_content": "hmm"}, {"reasoning_content": "!", "content": "Hi"}]
    plain = Shape("r", "m", True, tokenizer, None, [])
    assert "reasoning_content" not in plain.whole([Choice(0, ["Hi"])], {})["choices"][0]["message"]


def test_calls_after_the_thought_are_tool_calls_streamed_or_whole():
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    shape = Shape("r", "m", True, node().tokenizer, None, [ADD], reasoning=True)
    choice = shape.whole([Choice(0, [call], reasoning=["I should add."], finish="stop")], {})["choices"][0]
    assert (
        choice["finish_reason"] == "tool_calls" and choice["message"]["reasoning_content"] == "I should add."
    )
    assert choice["message"]["content"] is None and len(choice["message"]["tool_calls"]) == 1
    chunks = Chunks(shape, 1, [])
    out = [
        c
        for e in (Delta(0, "", (), "I should add."), Delta(0, call, ()), Finish(0, "stop"))
        for c in chunks.of(e)
    ]
    deltas = [c["choices"][0]["delta"] for c in out]
    assert deltas[0] == {"reasoning_content": "I should add."}
    assert (
        deltas[1]["tool_calls"][0]["function"]["name"] == "add"
        and out[-1]["choices"][0]["finish_reason"] == "tool_calls"
    )
