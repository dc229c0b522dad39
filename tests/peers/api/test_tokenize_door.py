"""/tokenize, /detokenize and /tokenizer_info at a peer's door, in process (one peer of the tiny
Llama over httpx's ASGI transport, as test_service_api.py's): vLLM's request forms and answers,
the chat path's rendering of messages and tools, refusals by name."""

import shutil
from pathlib import Path

import pytest

from tests.peers.api.test_service_api import HI, TEMPLATE, ask, error_of


def test_tokenize_and_detokenize_use_the_models_tokenizer(tiny_llama):
    async def calls(http, node):
        tok = node.tokenizer
        prompt = (await http.post("/tokenize", json={"model": "llama", "prompt": "Hello there"})).json()
        chat = (await http.post("/tokenize", json={"model": "llama", "messages": HI})).json()
        bare = (await http.post("/tokenize", json={"messages": HI, "add_generation_prompt": False})).json()
        back = (await http.post("/detokenize", json={"model": "llama", "tokens": prompt["tokens"]})).json()
        expected = (tok.encode("Hello there"), tok.encode_chat(HI), tok.encode_chat(HI, False))
        return prompt, chat, bare, back, expected

    prompt, chat, bare, back, (ids, chat_ids, bare_ids) = ask(tiny_llama, calls)
    assert prompt == {"tokens": ids, "count": len(ids), "max_model_len": 512, "token_strs": None}
    assert chat["tokens"] == chat_ids and chat["count"] == len(chat_ids)
    assert bare["tokens"] == bare_ids and len(bare_ids) < len(chat_ids)  # no assistant's turn opened
    assert back == {"prompt": "Hello there"}


def test_tokenize_options_as_vllm_takes_them(tiny_llama):
    """add_special_tokens, return_token_strs, continue_final_message (messages); an option of the
    other form, or add_generation_prompt given with continue_final_message, is a 400."""
    said = [*HI, {"role": "assistant", "content": "hel"}]

    async def calls(http, node):
        tok = node.tokenizer
        plain = (await http.post("/tokenize", json={"prompt": "Hello", "add_special_tokens": False})).json()
        strs = (await http.post("/tokenize", json={"prompt": "Hello", "return_token_strs": True})).json()
        cont = (await http.post("/tokenize", json={"messages": said, "continue_final_message": True})).json()
        refused = [
            await http.post("/tokenize", json={"prompt": "hi", "continue_final_message": True}),
            await http.post("/tokenize", json={"prompt": "hi", "add_generation_prompt": False}),
            await http.post(
                "/tokenize",
                json={"messages": said, "continue_final_message": True, "add_generation_prompt": True},
            ),
            await http.post("/tokenize", json={"messages": HI, "continue_final_message": True}),
        ]
        expected = (
            list(tok.hf.encode("Hello", add_special_tokens=False)),
            tok.encode("Hello"),
            tok.encode_chat(said, continue_final_message=True),
            tok.hf.convert_ids_to_tokens(tok.encode("Hello")),
        )
        return plain, strs, cont, refused, expected

    plain, strs, cont, refused, (bare_ids, ids, cont_ids, pieces) = ask(tiny_llama, calls)
    assert plain["tokens"] == bare_ids and plain["token_strs"] is None  # (present, null: as vLLM's)
    assert strs["tokens"] == ids and strs["token_strs"] == pieces
    assert cont["tokens"] == cont_ids
    params = [error_of(r, 400)["param"] for r in refused]
    assert params == [
        "continue_final_message",
        "add_generation_prompt",
        "continue_final_message",
        "continue_final_message",
    ]


def with_bos(tiny_llama: Path, where: Path, template: bool = True) -> Path:
    """A copy of the tiny Llama whose tokenizer puts a BOS before a text it encodes (as Llama's);
    without `template`, it has no chat template."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    shutil.copytree(tiny_llama, where)
    hf = AutoTokenizer.from_pretrained(where)
    hf.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if not template:
        hf.chat_template = None
        (where / "chat_template.jinja").unlink()
    hf.save_pretrained(where)
    return where


def test_tokenize_adds_special_tokens_to_messages_only_when_asked(tiny_llama, tmp_path):
    """As vLLM's: messages get no special tokens beyond the template's unless add_special_tokens
    is true, when the rendered text is encoded as a prompt is (the BOS put before the template's)."""
    said = [*HI, {"role": "assistant", "content": "hel"}]

    async def calls(http, node):
        def tokens(**body):
            return http.post("/tokenize", json=body)

        answers = [
            await tokens(messages=HI),
            await tokens(messages=HI, add_special_tokens=False),
            await tokens(messages=HI, add_special_tokens=True),
            await tokens(messages=said, continue_final_message=True, add_special_tokens=True),
            await tokens(prompt="hi"),
            await tokens(prompt="hi", add_special_tokens=False),
        ]
        hf = node.tokenizer.hf

        def rendered(messages, **kw):
            return hf.apply_chat_template(messages, tokenize=False, **kw)

        expected = [
            node.tokenizer.encode_chat(HI),
            node.tokenizer.encode_chat(HI),
            hf.encode(rendered(HI, add_generation_prompt=True)),
            hf.encode(rendered(said, continue_final_message=True)),
            hf.encode("hi"),
            hf.encode("hi", add_special_tokens=False),
        ]
        return [r.json()["tokens"] for r in answers], expected

    got, expected = ask(with_bos(tiny_llama, tmp_path / "bos"), calls)
    assert got == expected
    template, on_top = got[0], got[2]
    assert template[0] == 1 and on_top == [1, *template]  # the template's <s>, and one more on top
    assert got[4] == [1, *got[5]]

    async def generic(http, node):  # no chat template: the generic prompt carries the BOS already
        body = {"messages": HI, "add_special_tokens": True}
        return node.tokenizer.has_chat_template, await http.post("/tokenize", json=body)

    has_template, refused = ask(with_bos(tiny_llama, tmp_path / "bare", template=False), generic)
    assert not has_template and error_of(refused, 400)["param"] == "add_special_tokens"


@pytest.mark.slow
def test_token_strs_are_the_vocabularys_pieces(default_model):
    """return_token_strs gives the vocabulary's entries as it spells them (byte-level BPE: 'Ġis'),
    as vLLM's convert_ids_to_tokens, not each token's decoded text."""
    prompt = "This is a token_strs test prompt! vllm1"

    async def calls(http, node):
        r = await http.post("/tokenize", json={"prompt": prompt, "return_token_strs": True})
        return r.json(), node.tokenizer.hf

    answer, hf = ask(default_model, calls, layers="0:30")
    ids = hf.encode(prompt)
    assert answer["tokens"] == ids and answer["token_strs"] == hf.convert_ids_to_tokens(ids)
    assert "Ġis" in answer["token_strs"]


def test_tokenize_refuses_bad_requests_in_openai_error_json(tiny_llama):
    async def calls(http, node):
        vocab = node.model_config.vocab_size
        return (
            await http.post("/detokenize", json={"tokens": [5, vocab]}),
            await http.post("/detokenize", json={"tokens": [-1]}),
            await http.post("/detokenize", json={"tokens": [1.5]}),
            await http.post("/tokenize", json={"prompt": "hi", "return_tokens_as_ids": True}),
            await http.post("/detokenize", json={"tokens": [5], "skip_special": True}),
            await http.post("/tokenize", json={"prompt": "hi", "messages": HI}),
            await http.post("/tokenize", json={}),
            await http.post("/tokenize", json={"model": "gpt-4o", "prompt": "hi"}),
            await http.post("/tokenize", json={"prompt": "x" * (512 * 64 + 1)}),
        )

    too_big, negative, fraction, unknown, unknown_too, both, neither, model, too_long = ask(tiny_llama, calls)
    for r in (too_big, negative):
        error = error_of(r, 400)
        assert error["param"] == "tokens" and "vocabulary" in error["message"], error
    assert error_of(fraction, 400)["param"] == "tokens.0"
    assert error_of(unknown, 400)["param"] == "return_tokens_as_ids"
    assert "return_tokens_as_ids" in error_of(unknown, 400)["message"]
    assert error_of(unknown_too, 400)["param"] == "skip_special"
    assert error_of(both, 400)["type"] == "invalid_request_error"
    assert error_of(neither, 400)["type"] == "invalid_request_error"
    assert error_of(model, 404)["code"] == "model_not_found"
    assert error_of(too_long, 400)["code"] == "context_length_exceeded"  # the chat route's limit


def test_tokenize_takes_chat_template_kwargs(tiny_llama):
    template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% else %}<think>{% endif %}"
    )

    async def calls(http, node):
        on = await http.post("/tokenize", json={"messages": HI})
        off = await http.post(
            "/tokenize", json={"messages": HI, "chat_template_kwargs": {"enable_thinking": False}}
        )
        unread = await http.post(
            "/tokenize", json={"messages": HI, "chat_template_kwargs": {"thinking": False}}
        )
        prompt = await http.post(
            "/tokenize", json={"prompt": "hi", "chat_template_kwargs": {"enable_thinking": False}}
        )
        huge = {"enable_thinking": "x" * (node.context_length * 64)}  # rendered into the prompt too
        too_long = await http.post("/tokenize", json={"messages": HI, "chat_template_kwargs": huge})
        encode = node.tokenizer.hf.encode
        return on.json()["tokens"], off.json()["tokens"], unread, prompt, encode, too_long

    on, off, unread, prompt, encode, too_long = ask(tiny_llama, calls, chat_template=template)
    assert error_of(too_long, 400)["code"] == "context_length_exceeded"
    assert on == encode("hi<think>", add_special_tokens=False)
    assert off == encode("hi<think></think>", add_special_tokens=False)
    assert "does not read thinking" in error_of(unread, 400)["message"]
    assert error_of(prompt, 400)["param"] == "chat_template_kwargs"


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
        },
    }
]


TOOLS_TEMPLATE = (  # a chat template that renders the tools itself
    "{% if tools %}[{% for t in tools %}{{ t['function']['name'] }};{% endfor %}]{% endif %}"
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
)


@pytest.mark.parametrize("template", [None, TOOLS_TEMPLATE], ids=["generic-tool-prompt", "template-tools"])
def test_tokenize_renders_tools_as_the_chat_does(tiny_llama, template):
    """/tokenize's ids for messages and tools are those a chat of them feeds the model, whether
    the chat template renders the tools or the generic tool prompt does; with a prompt, tools
    are a 400 naming them."""
    choices = ({}, {"tool_choice": "required"}, {"tool_choice": "none"})

    async def calls(http, node):
        fed, real = [], node.tokenizer.encode_chat
        node.tokenizer.encode_chat = lambda *a, **kw: fed.append(real(*a, **kw)) or fed[-1]
        chats, tokenized = [], []
        for extra in choices:
            body = {"messages": HI, "tools": TOOLS, **extra}
            chat = await http.post("/v1/chat/completions", json={**body, "model": "llama", "max_tokens": 1})
            chats.append((chat.status_code, fed[-1]))
            tokenized.append((await http.post("/tokenize", json=body)).json()["tokens"])
        bare = (await http.post("/tokenize", json={"messages": HI})).json()["tokens"]
        refused = [
            await http.post("/tokenize", json={"prompt": "hi", "tools": TOOLS}),
            await http.post("/tokenize", json={"messages": HI, "tool_choice": "required"}),
        ]
        return chats, tokenized, bare, refused

    settings = {"chat_template": template} if template else {}
    chats, tokenized, bare, refused = ask(tiny_llama, calls, **settings)
    assert [status for status, _ in chats] == [200] * len(choices)
    assert tokenized == [ids for _, ids in chats]
    auto, required, none = tokenized
    assert auto != bare and none == bare  # tool_choice "none": no tools rendered, as the chat's
    assert (required != auto) == (template is None)  # (the generic prompt says a call is required)
    error = error_of(refused[0], 400)
    assert error["param"] == "tools" and "goes with messages" in error["message"]
    assert "tool_choice needs tools" in error_of(refused[1], 400)["message"]


def test_tokenizer_info_as_vllm_gives_it(tiny_llama):
    async def calls(http, node):
        return (await http.get("/tokenizer_info")).json(), node.tokenizer.hf

    (info, hf), (replaced, _) = ask(tiny_llama, calls), ask(tiny_llama, calls, chat_template=TEMPLATE)
    assert info["tokenizer_class"] == type(hf).__name__
    assert info["max_model_len"] == 512 and info["model_max_length"] == hf.model_max_length
    special = {k: info[k] for k in info if k.split("_")[0] in ("bos", "eos", "pad", "unk")}
    assert special == {
        "bos_token": "<s>",
        "bos_token_id": 1,
        "eos_token": "</s>",
        "eos_token_id": 2,
        "pad_token": None,
        "pad_token_id": None,
        "unk_token": "<unk>",
        "unk_token_id": 0,
    }
    assert info["added_tokens_decoder"] == {"0": "<unk>", "1": "<s>", "2": "</s>"}
    assert info["chat_template"] == hf.chat_template and replaced["chat_template"] == TEMPLATE
    assert not [k for k in info if k.endswith("_file") or k == "name_or_path"]  # no paths of the peer's
