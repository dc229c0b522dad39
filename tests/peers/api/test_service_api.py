"""The rest of the OpenAI door, in process (one peer of the tiny Llama over httpx's ASGI
transport): model cards, /version, OpenAI error JSON for unknown paths and methods, CORS,
--served-model-name and --chat-template (the tokenizer's routes: test_tokenize_door.py)."""

import asyncio
import subprocess
import sys
from importlib.metadata import version

import httpx
import pytest

from peers.option_values import read_chat_template, read_origins
from tests.peers.test_inprocess import start_swarm, stop_swarm

ORIGIN = "http://good.example"
TEMPLATE = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
HI = [{"role": "user", "content": "hi"}]


def ask(model, calls, layers: str = "0:4", **settings):
    """Start one peer of all `layers` (NodeConfig `settings`), run `await calls(http, node)`
    against its app, stop it; returns what `calls` returned."""

    async def main():
        net, (node,) = await start_swarm(model, [layers], settings={0: settings})
        try:
            transport = net.apps[node.config.address]
            async with httpx.AsyncClient(transport=transport, base_url="http://peer") as http:
                return await calls(http, node)
        finally:
            await stop_swarm([node])

    return asyncio.run(main())


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def test_model_cards(tiny_llama):
    async def calls(http, node):
        return (
            (await http.get("/v1/models")).json(),
            (await http.get("/v1/models/llama")).json(),
            await http.get("/v1/models/gpt-4o"),
            await http.get("/v1/models/org/name"),
        )

    listed, card, unknown, slashed = ask(tiny_llama, calls)
    assert listed["object"] == "list" and listed["data"] == [card]
    assert card["id"] == "llama" and card["object"] == "model" and card["owned_by"] == "layerswarm"
    assert card["max_model_len"] == 512 and isinstance(card["created"], int)
    assert error_of(unknown, 404)["code"] == "model_not_found"
    assert error_of(slashed, 404)["code"] == "model_not_found"  # an id with a slash is an id too


def test_version_and_openai_errors_for_unknown_paths_and_methods(tiny_llama):
    async def calls(http, node):
        return (
            await http.get("/version"),
            await http.get("/v1/nothing-here"),
            await http.get("/v1/chat/completions"),
            await http.delete("/tokenize"),
            await http.get("/swarm/table"),
            await http.post("/swarm/gossip", json={"peers": "not a list"}),
            await http.post("/swarm/steps", content=b"not a frame"),
        )

    ver, missing, wrong, wrong_too, table, gossip, steps = ask(tiny_llama, calls)
    assert ver.json() == {"version": version("layerswarm")}
    assert error_of(missing, 404)["code"] == "not_found"
    assert "/v1/nothing-here" in error_of(missing, 404)["message"]
    assert error_of(wrong, 405)["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"
    assert (
        error_of(wrong_too, 405)["type"] == "invalid_request_error" and wrong_too.headers["allow"] == "POST"
    )
    # the peers' own endpoints answer as before
    assert table.status_code == 200 and table.json()["model"] == "llama"
    assert gossip.status_code == 400 and gossip.json()["error"]["message"].startswith("bad gossip")
    assert steps.status_code == 400 and "error" in steps.json()


def preflight(origin: str, path: str = "/v1/chat/completions") -> dict:
    return {
        "method": "OPTIONS",
        "url": path,
        "headers": {
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-request-id",
        },
    }


def test_cors_answers_the_allowed_origins_only(tiny_llama):
    async def calls(http, node):
        return (
            await http.request(**preflight(ORIGIN)),
            await http.request(**preflight("http://evil.example")),
            await http.get("/v1/models", headers={"origin": ORIGIN, "authorization": "Bearer wrong-key-9"}),
            await http.get("/v1/models", headers={"origin": ORIGIN, "authorization": "Bearer secret-key-1"}),
            await http.get("/version", headers={"origin": "http://evil.example"}),
        )

    # with an API key: the preflight carries none, and is answered all the same
    ok, evil, refused, simple, evil_simple = ask(
        tiny_llama, calls, allowed_origins=(ORIGIN,), api_keys=("secret-key-1",)
    )
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert set(ok.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST", "OPTIONS"}
    assert "x-request-id" in ok.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in evil.headers
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == ORIGIN
    assert simple.headers["access-control-expose-headers"].lower() == "x-request-id"
    assert "x-request-id" in simple.headers
    assert "access-control-allow-origin" not in evil_simple.headers


def test_no_cors_headers_without_the_flag(tiny_llama):
    async def calls(http, node):
        return await http.request(**preflight(ORIGIN)), await http.get(
            "/v1/models", headers={"origin": ORIGIN}
        )

    options, simple = ask(tiny_llama, calls)
    assert error_of(options, 405)["code"] == "method_not_allowed"
    assert not [h for h in (*options.headers, *simple.headers) if h.startswith("access-control-")]


def test_any_origin(tiny_llama):
    async def calls(http, node):
        return await http.request(**preflight("http://anywhere.example"))

    r = ask(tiny_llama, calls, allowed_origins=("*",))
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


def test_served_model_names(tiny_llama):
    """The API answers to the served names only (as vLLM: the model's own id is not one unless
    named) and reports the first; the swarm keeps the real id."""

    async def calls(http, node):
        def chat(model):
            body = {"model": model, "messages": HI, "max_tokens": 3, "temperature": 0}
            return http.post("/v1/chat/completions", json=body)

        return (
            await chat("second"),
            await http.post("/v1/completions", json={"model": "alias", "prompt": "hi", "max_tokens": 2}),
            await chat("llama"),
            (await http.get("/v1/models")).json(),
            (await http.get("/v1/models/second")).json(),
            await http.post("/tokenize", json={"model": "llama", "prompt": "hi"}),
            (await http.get("/swarm/table")).json()["model"],
        )

    by_alias, completion, real, listed, card, tokenize, swarm_model = ask(
        tiny_llama, calls, served_model_names=("alias", "second")
    )
    assert by_alias.status_code == 200, by_alias.text
    assert by_alias.json()["model"] == "alias" and by_alias.json()["usage"]["completion_tokens"] >= 1
    assert completion.status_code == 200 and completion.json()["model"] == "alias"
    error = error_of(real, 404)
    assert error["code"] == "model_not_found" and "'alias'" in error["message"]
    assert [m["id"] for m in listed["data"]] == ["alias"] and card["id"] == "alias"
    assert error_of(tokenize, 404)["code"] == "model_not_found"
    assert swarm_model == "llama"


def test_served_model_names_are_checked():
    from peers.config import NodeConfig

    with pytest.raises(ValueError, match="repeat"):
        NodeConfig(served_model_names=("a", "a"))
    with pytest.raises(ValueError, match="served model name"):
        NodeConfig(served_model_names=("",))
    with pytest.raises(ValueError, match="'http://good.example/'"):
        NodeConfig(allowed_origins=("http://good.example/",))
    assert read_origins(" http://a.example, http://b.example:8080 ,") == (
        "http://a.example",
        "http://b.example:8080",
    )


def test_a_chat_template_from_a_file_changes_tokenize(tiny_llama, tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    text = read_chat_template(str(path))
    assert text == TEMPLATE and read_chat_template(TEMPLATE) == TEMPLATE  # a file, or the text itself

    async def calls(http, node):
        r = await http.post("/tokenize", json={"messages": HI})
        return r.json()["tokens"], node.tokenizer._tok.encode("[hi]>", add_special_tokens=False)

    got, expected = ask(tiny_llama, calls, chat_template=text)
    assert got == expected


def test_bad_chat_templates_are_refused_naming_the_flag(tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(ValueError, match=f"--chat-template {broken}: the chat template does not compile"):
        read_chat_template(str(broken))
    with pytest.raises(ValueError, match="--chat-template 'no/such/template.jinja' is neither a file"):
        read_chat_template("no/such/template.jinja")


def test_a_broken_chat_template_stops_the_peer_at_start(tiny_llama):
    cmd = [sys.executable, "-m", "peers.cli", "serve", "--model", str(tiny_llama), "--port", "1"]
    done = subprocess.run(
        [*cmd, "--chat-template", "{{ messages[0] "], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        "peer: error: --chat-template (the text given): the chat template does not compile: line 1"
        in done.stderr
    )
