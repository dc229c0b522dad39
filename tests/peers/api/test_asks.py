"""What a request asks for, checked without a swarm: the schema's refusals, admission, max_tokens,
prompts, grammars and the run specs a request becomes."""

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from peers.api.asks import (
    COMPLETION_MAX_TOKENS,
    DEFAULT_MAX_TOKENS,
    Ask,
    admit,
    chat_grammar,
    max_tokens_for,
    run_specs,
)
from peers.api.prompts import check_prompt_size, completion_prompts, text_of
from peers.api.schema import ChatRequest, CompletionRequest
from peers.transport.errors import InvalidRequest, ModelNotServed, SwarmUnavailable
from tests.peers.api.fakes import node as fake_node

USER = [{"role": "user", "content": "hi"}]
ASSISTANT_LAST = [*USER, {"role": "assistant", "content": "hel"}]
TOOLS = [{"type": "function", "function": {"name": "add"}}]


def peer(**kw) -> SimpleNamespace:
    fields = {
        "served_names": ("m",),
        "served_model": "m",
        "active_requests": 0,
        "config": SimpleNamespace(speculative=True),
        "stopping": False,
        "table": SimpleNamespace(me=SimpleNamespace(state="serving")),
        "context_length": 16,
        "model_config": SimpleNamespace(vocab_size=100),
        "should_verify": lambda: False,
    }
    return fake_node(**{**fields, **kw})


@pytest.mark.parametrize(
    "body, says",
    [
        ({"model": "m", "messages": USER, "top_logprobs": 2}, "top_logprobs needs logprobs"),
        ({"model": "m", "messages": USER, "tool_choice": "auto"}, "tool_choice needs tools"),
        ({"model": "m", "messages": USER, "logit_bias": {"x": 1}}, "logit_bias maps token ids"),
        ({"model": "m", "messages": USER, "continue_final_message": True}, "continues a final assistant"),
        (
            {
                "model": "m",
                "messages": ASSISTANT_LAST,
                "continue_final_message": True,
                "add_generation_prompt": True,
            },
            "contradict each other",
        ),
        ({"model": "m", "messages": USER, "seed": 2**63}, "seed"),
        ({"model": "m", "messages": USER, "seed": -(2**63) - 1}, "seed"),
        ({"model": "m", "messages": USER, "frobnicate": 1}, "frobnicate"),
        ({"model": "m", "messages": [{"role": "tool", "content": "1"}]}, "tool_call_id"),
        (
            {
                "model": "m",
                "messages": USER,
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "x"}},
            },
            "not among the tools",
        ),
    ],
)
def test_the_chat_schema_refuses(body, says):
    with pytest.raises(ValidationError, match=says):
        ChatRequest.model_validate(body)


def test_continuing_the_last_message_leaves_out_the_generation_prompt_unless_both_are_asked():
    continued = ChatRequest.model_validate(
        {"model": "m", "messages": ASSISTANT_LAST, "continue_final_message": True}
    )
    assert continued.continue_final_message and "add_generation_prompt" not in continued.model_fields_set
    both_off = {"continue_final_message": True, "add_generation_prompt": False}
    assert ChatRequest.model_validate(
        {"model": "m", "messages": ASSISTANT_LAST, **both_off}
    ).continue_final_message
    assert ChatRequest.model_validate({"model": "m", "messages": USER, "seed": 2**63 - 1}).seed == 2**63 - 1


@pytest.mark.parametrize(
    "body, says",
    [
        ({"model": "m", "prompt": "a", "n": 3, "best_of": 2}, r"best_of \(2\) must be at least n \(3\)"),
        ({"model": "m", "prompt": "a", "best_of": 2, "stream": True}, "best_of cannot be streamed"),
        ({"model": "m", "prompt": "a", "logprobs": 6}, "logprobs"),
    ],
)
def test_the_completion_schema_refuses(body, says):
    with pytest.raises(ValidationError, match=says):
        CompletionRequest.model_validate(body)


def test_admission():
    req = CompletionRequest(model="m", prompt="a")
    admit(peer(), req)
    with pytest.raises(ModelNotServed):
        admit(peer(), CompletionRequest(model="other", prompt="a"))
    with pytest.raises(SwarmUnavailable, match="shutting down"):
        admit(peer(stopping=True), req)


def test_max_tokens_fit_the_context():
    assert max_tokens_for(peer(), CompletionRequest(model="m", prompt="a"), [1] * 6) == 10
    # left out: 16 for a completion (OpenAI's legacy API and vLLM), what the context has left
    # (at most DEFAULT_MAX_TOKENS) for a chat
    assert (
        max_tokens_for(peer(context_length=4096), CompletionRequest(model="m", prompt="a"), [1])
        == COMPLETION_MAX_TOKENS
        == 16
    )
    assert (
        max_tokens_for(peer(context_length=4096), ChatRequest(model="m", messages=USER), [1])
        == DEFAULT_MAX_TOKENS
    )
    with pytest.raises(
        InvalidRequest, match="maximum context length is 16 tokens; the prompt has 6 tokens and 11"
    ):
        max_tokens_for(peer(), CompletionRequest(model="m", prompt="a", max_tokens=11), [1] * 6)
    with pytest.raises(InvalidRequest, match="at most 4 stop sequences"):
        max_tokens_for(peer(), CompletionRequest(model="m", prompt="a", stop=list("abcde")), [1])


def test_prompts_are_checked_before_tokenizing():
    with pytest.raises(InvalidRequest, match="holds at most 1024"):
        check_prompt_size(peer(), 1025, "prompt")
    with pytest.raises(InvalidRequest, match="must not be empty"):
        completion_prompts(peer(), CompletionRequest(model="m", prompt=""))
    with pytest.raises(InvalidRequest, match=r"must be in \[0, 100\)"):
        completion_prompts(peer(), CompletionRequest(model="m", prompt=[1, 100]))
    echoed = CompletionRequest(model="m", prompt="a", echo=True, logprobs=1)
    assert completion_prompts(peer(), echoed) == ["a"]
    assert completion_prompts(peer(), CompletionRequest(model="m", prompt=["a", "b"])) == ["a", "b"]
    assert text_of([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    with pytest.raises(InvalidRequest, match="only text content parts"):
        text_of([{"type": "image_url", "image_url": {}}])


def test_structured_output_and_forced_calls_exclude_each_other():
    req = ChatRequest(
        model="m", messages=USER, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}
    )
    with pytest.raises(InvalidRequest, match="exclude each other"):
        chat_grammar(req, list(req.tools))
    req = ChatRequest(model="m", messages=USER, response_format={"type": "json_object"}, ignore_eos=True)
    with pytest.raises(InvalidRequest, match="ignore_eos cannot end"):
        chat_grammar(req, [])
    assert chat_grammar(ChatRequest(model="m", messages=USER), []) is None


def test_a_request_becomes_one_run_spec_per_prompt():
    req = CompletionRequest(
        model="m", prompt=["a", "b"], n=2, stop="x", stop_token_ids=[7], repetition_penalty=1.5
    )
    specs = run_specs(peer(), req, Ask(chat=False), [[3, 3, 1], [2]], [4, 5])
    assert [(s.prompt_ids, s.max_tokens, s.n, s.stops) for s in specs] == [
        ([3, 3, 1], 4, 2, ["x"]),
        ([2], 5, 2, ["x"]),
    ]
    assert specs[0].stop_ids == {0, 7} and specs[0].sampling.prompt_tokens == (1, 3)
    assert specs[1].sampling.prompt_tokens == (2,) and specs[0].steering.counts
    with pytest.raises(InvalidRequest, match=r"logit_bias names token ids outside \[0, 100\)"):
        run_specs(
            peer(),
            CompletionRequest(model="m", prompt="a", logit_bias={"100": 1}),
            Ask(chat=False),
            [[1]],
            [1],
        )
