"""The OpenAI door on real peers of a tiny random model: logprobs equal the monolithic model's,
sampling controls pick what a reference implementation picks, structured output always parses
(drafting or not), completions take every prompt form, and unknown parameters are refused."""

import json

import httpx
import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers import monolithic

EOS = 2
A = ord("a") - 29  # the byte tokenizer's id of "a"


@pytest.fixture(scope="module")
def model(tiny_llama):
    return monolithic(tiny_llama)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def post(peer, path, body, timeout=60):
    return httpx.post(f"{peer.url}{path}", json={"model": "llama", **body}, timeout=timeout)


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


@torch.no_grad()
def last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].float()


@torch.no_grad()
def reference(
    model, ids, n, *, bias=None, presence=0.0, frequency=0.0, repetition=1.0, min_tokens=0, stops=(EOS,)
):
    """Greedy decoding with the controls written out plainly: logit bias, then the repetition
    penalty over prompt and output, then presence and frequency over the output, then no stop id
    before min_tokens."""
    out: list[int] = []
    for _ in range(n):
        x = last_logits(model, ids + out)
        for t, b in (bias or {}).items():
            x[t] += b
        if repetition != 1:
            for t in set(ids + out):
                x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
        for t in set(out):
            x[t] -= presence + frequency * out.count(t)
        if len(out) < min_tokens:
            x[list(stops)] = float("-inf")
        out.append(int(x.argmax()))
        if out[-1] in stops:
            break
    return out


def test_logprobs_equal_the_monolithic_log_softmax(tiny_swarm, model, tok):
    ids = tok.encode("hello swarm")
    data = ok(
        post(
            tiny_swarm.peers[0],
            "/v1/completions",
            {"prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 3},
        )
    )
    lp = data["choices"][0]["logprobs"]
    generated = []
    for i in range(6):
        want = torch.log_softmax(last_logits(model, ids + generated), dim=-1)
        top = want.topk(3)
        token = int(top.indices[0])
        assert lp["tokens"][i] == tok.decode([token])
        assert lp["token_logprobs"][i] == pytest.approx(float(want[token]), abs=1e-4)
        got = lp["top_logprobs"][i]
        for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert got[tok.decode([t])] == pytest.approx(v, abs=1e-4)
        generated.append(token)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]

    # chat: the same numbers in the chat shape, streamed and not
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    whole = ok(
        post(tiny_swarm.peers[1], "/v1/chat/completions", {**body, "logprobs": True, "top_logprobs": 2})
    )
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == whole["usage"]["completion_tokens"] - (
        whole["choices"][0]["finish_reason"] == "stop"
    )
    for entry in content:
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy: the best
        assert bytes(entry["bytes"]).decode() == entry["token"]
    streamed = []
    with httpx.stream(
        "POST",
        f"{tiny_swarm.peers[1].url}/v1/chat/completions",
        json={"model": "llama", **body, "logprobs": True, "top_logprobs": 2, "stream": True},
        timeout=60,
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    streamed += (c.get("logprobs") or {}).get("content") or []
    assert streamed == content
    # no logprobs asked: none computed nor sent
    assert ok(post(tiny_swarm.peers[1], "/v1/chat/completions", body))["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    "controls, body",
    [
        ({"bias": {A: 8.0, 50: -100.0}}, {"logit_bias": {str(A): 8, "50": -100}}),
        ({"presence": 1.5}, {"presence_penalty": 1.5}),
        ({"frequency": 0.8}, {"frequency_penalty": 0.8}),
        ({"repetition": 1.6}, {"repetition_penalty": 1.6}),
        ({"min_tokens": 12}, {"min_tokens": 12}),
    ],
    ids=["logit_bias", "presence", "frequency", "repetition", "min_tokens"],
)
def test_sampling_controls_choose_what_the_reference_chooses(tiny_swarm, model, tok, controls, body):
    # a prompt whose greedy output ends early (min_tokens has something to hold back)
    ids = next(
        ids
        for ids in (tok.encode(f"{p} {i}") for i in range(200) for p in ("the quick brown fox", "abc"))
        if EOS in reference(model, ids, 10)
    )
    plain = reference(model, ids, 16)
    want = reference(model, ids, 16, **controls)
    assert want != plain  # the control matters for this prompt
    data = ok(
        post(
            tiny_swarm.peers[0],
            "/v1/completions",
            {"prompt": ids, "max_tokens": 16, "temperature": 0, **body},
        )
    )
    text = data["choices"][0]["text"]
    assert text == tok.decode([t for t in want if t != EOS])


def test_stop_token_ids_end_the_output(tiny_swarm, model, tok):
    ids = tok.encode("pipeline")
    plain = reference(model, ids, 12)
    stop = plain[5]  # the sixth token generated
    want = reference(model, ids, 12, stops=(EOS, stop))
    data = ok(
        post(
            tiny_swarm.peers[2],
            "/v1/completions",
            {"prompt": ids, "max_tokens": 12, "temperature": 0, "stop_token_ids": [stop]},
        )
    )
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == tok.decode(want[: want.index(stop)])


def test_min_p_keeps_only_likely_tokens(tiny_swarm):
    """min_p 1: only the likeliest token survives, so sampling at any temperature is greedy."""
    greedy = ok(
        post(tiny_swarm.peers[0], "/v1/completions", {"prompt": "abc", "max_tokens": 10, "temperature": 0})
    )
    for seed in range(3):
        body = {"prompt": "abc", "max_tokens": 10, "temperature": 1.5, "min_p": 1.0, "seed": seed}
        got = ok(post(tiny_swarm.peers[0], "/v1/completions", body))
        assert got["choices"][0]["text"] == greedy["choices"][0]["text"]


SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        },
        "required": ["ok", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "required": ["point"],
        "additionalProperties": False,
    },
]


@pytest.mark.parametrize("speculative", [False, True])
def test_structured_output_always_validates(tiny_swarm, speculative):
    """A random model left to itself writes no JSON; constrained, every answer validates, with
    drafting on too (the prompt holds JSON the drafter proposes from)."""
    entry = tiny_swarm.peers[0]
    prompt = 'Answer as JSON like {"name": "ab", "age": 3}, {"ok": true, "tags": ["a"]}, {"point": {"x": 1, "y": 2}}'
    for i, schema in enumerate(SCHEMAS):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        for seed in range(3):
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 120,
                "temperature": 0.8,
                "seed": seed,
                "response_format": fmt,
                "speculative": speculative,
            }
            data = ok(post(entry, "/v1/chat/completions", body))
            text = data["choices"][0]["message"]["content"]
            assert data["choices"][0]["finish_reason"] == "stop", text
            jsonschema.validate(json.loads(text), schema)


def test_structured_output_drafts_tokens(tiny_swarm):
    """Greedy output that copies the prompt's JSON: the drafter's tokens are checked in one step
    and the grammar's masks go with each drafted position."""
    entry = tiny_swarm.peers[0]
    before = httpx.get(f"{entry.url}/health", timeout=5).json()["speculation"]["drafted"]
    schema = {
        "type": "object",
        "properties": {"k": {"enum": ["aaaa", "bbbb"]}},
        "required": ["k"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "k", "schema": schema}}
    for prompt in ('{"k": "aaaa"} {"k": "aaaa"}', '{"k": "bbbb"} {"k": "bbbb"}'):
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 40,
            "temperature": 0,
            "response_format": fmt,
        }
        plain = ok(post(entry, "/v1/chat/completions", {**body, "speculative": False}))
        drafted = ok(post(entry, "/v1/chat/completions", body))
        assert drafted["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(drafted["choices"][0]["message"]["content"]), schema)
    assert httpx.get(f"{entry.url}/health", timeout=5).json()["speculation"]["drafted"] > before


def test_completions_take_every_prompt_form(tiny_swarm, tok):
    entry = tiny_swarm.peers[1]

    def texts(prompt, **extra) -> list[str]:
        body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, **extra}
        return [c["text"] for c in ok(post(entry, "/v1/completions", body))["choices"]]

    one, two = texts("abc")[0], texts("zz top")[0]
    assert texts(["abc", "zz top"]) == [one, two]
    assert texts(tok.encode("abc")) == [one]
    assert texts([tok.encode("abc"), tok.encode("zz top")]) == [one, two]
    assert texts(["abc", "zz top"], n=2) == [one, one, two, two]
    assert texts("abc", echo=True) == ["abc" + one]
    # streamed: the echo first, then the same text
    chunks: dict[int, str] = {}
    body = {
        "model": "llama",
        "prompt": ["abc", "zz top"],
        "max_tokens": 5,
        "temperature": 0,
        "echo": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{entry.url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    chunks[c["index"]] = chunks.get(c["index"], "") + c["text"]
    assert chunks == {0: "abc" + one, 1: "zz top" + two}


def test_completion_logprobs_hold_the_chosen_token_and_up_to_logprobs_more(tiny_swarm):
    """As OpenAI's legacy API: `logprobs: k` gives the k likeliest tokens and the chosen one (up to
    k + 1 entries), also for k = 0; and a completion that names no max_tokens gets 16."""
    entry = tiny_swarm.peers[0]
    for k in (0, 2):
        body = {"prompt": "abc", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": k}
        lp = ok(post(entry, "/v1/completions", body))["choices"][0]["logprobs"]
        assert len(lp["top_logprobs"]) == len(lp["tokens"]) == 4, lp
        for token, chosen, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
            assert top[token] == chosen and 1 <= len(top) <= k + 1, (k, top)
    unsized = ok(post(entry, "/v1/completions", {"prompt": "abc", "temperature": 0, "ignore_eos": True}))
    assert unsized["usage"]["completion_tokens"] == 16


def test_best_of_keeps_the_likeliest(tiny_swarm):
    entry = tiny_swarm.peers[0]
    body = {"prompt": "abc", "max_tokens": 6, "temperature": 1.0, "seed": 7}
    many = ok(post(entry, "/v1/completions", {**body, "n": 4, "logprobs": 0}))["choices"]
    total = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in many}
    best = ok(post(entry, "/v1/completions", {**body, "n": 1, "best_of": 4}))
    assert best["choices"][0]["text"] == max(total, key=total.get)
    assert best["usage"]["completion_tokens"] == 4 * 6


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "functions": []},
            "functions",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "audio": {}}, "audio"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x", "weird": 1}]},
            "messages.0.weird",
        ),
        ("/v1/completions", {"prompt": "x", "top_logprobs": 2}, "top_logprobs"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, None),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "stream_options": {"x": 1}},
            "stream_options.x",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {"type": "nonsense"}},
                },
            },
            "response_format",
        ),
    ],
)
def test_what_is_not_implemented_is_refused_by_name(tiny_swarm, path, body, param):
    r = post(tiny_swarm.peers[0], path, {"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if param is not None:
        assert error["param"] == param, error
        assert param.split(".")[-1] in error["message"]


def test_metadata_fields_are_accepted(tiny_swarm):
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 2,
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
    }
    data = ok(post(tiny_swarm.peers[0], "/v1/chat/completions", body))
    assert data["system_fingerprint"].startswith("fp_")


def test_continue_final_message_continues_it(tiny_swarm, model, tok):
    """The assistant's last message is continued, not answered: the prompt ends with its text."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "abc"}]
    ids = tok.apply_chat_template(messages, continue_final_message=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = tok.decode(reference(model, ids, 6), skip_special_tokens=True)
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, "continue_final_message": True}
    data = ok(post(tiny_swarm.peers[0], "/v1/chat/completions", body))
    assert data["choices"][0]["message"]["content"] == want


IGNORE_CONTROLS = """
import inference.step_sampling
from inference.sampling import RowControls
inference.step_sampling._row_controls = lambda controls, sampling, vocab: RowControls()  # samples as it likes
"""


def test_a_last_peer_ignoring_the_grammar_is_caught_and_routed_around(tiny_llama, make_swarm):
    """A last peer that drops the controls samples tokens the mask forbids: the entry sees it at
    once, fails over to the honest replica and bans the other; every answer still validates."""
    s = make_swarm(tiny_llama)
    entry = s.add("0:2")
    s.add("2:4", patch=IGNORE_CONTROLS)
    s.add("2:4")
    s.wait_ready()
    s.wait_route(entry)
    schema = SCHEMAS[0]
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    for i in range(12):
        body = {
            "messages": [{"role": "user", "content": f"person {i}"}],
            "max_tokens": 80,
            "temperature": 0.8,
            "seed": i,
            "response_format": fmt,
        }
        jsonschema.validate(
            json.loads(ok(post(entry, "/v1/chat/completions", body))["choices"][0]["message"]["content"]),
            schema,
        )
        if entry.health()["failovers"]:
            break
    assert entry.health()["failovers"] >= 1  # the liar was on a route, and was caught there
    log = entry.log_path.read_text()
    assert "the step's grammar mask forbids" in log
