"""The door's routes, in-process on a fake peer: each path and method is registered, and the
service routes answer in their shapes."""

from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from peers.api import openai_routes, responses, service_routes
from tests.peers.api.fakes import node


def peer() -> SimpleNamespace:
    return node(
        served_model="m",
        served_names=("m", "alias"),
        context_length=64,
        model_config=SimpleNamespace(vocab_size=200),
        model_id="smollm2-135m",  # (a built-in: its card's sampling, no generation_config.json here)
        model_path="/nonexistent",
        config=SimpleNamespace(
            generation_config="auto",
            max_cache_tokens=1024,
            max_requests=4,
            max_waiting=4,
            scheduler=SimpleNamespace(max_queue_wait_s=10.0),
        ),
    )


def test_the_routes_and_their_methods():
    door = openai_routes.OpenAIDoor(peer())
    routers = (openai_routes.router(door), responses.router(door), service_routes.router(peer()))
    routes = {(r.path, m) for api in routers for r in api.routes for m in r.methods}
    assert routes == {
        ("/v1/chat/completions", "POST"),
        ("/v1/completions", "POST"),
        ("/v1/responses", "POST"),
        ("/v1/responses/{response_id}", "GET"),
        ("/v1/responses/{response_id}", "DELETE"),
        ("/v1/models", "GET"),
        ("/v1/models/{model:path}", "GET"),
        ("/tokenize", "POST"),
        ("/detokenize", "POST"),
        ("/tokenizer_info", "GET"),
        ("/version", "GET"),
    }


def test_the_service_routes_answer():
    app = FastAPI()
    app.include_router(service_routes.router(peer()))
    with TestClient(app) as client:
        (card,) = client.get("/v1/models").json()["data"]
        assert card["id"] == "m" and card["max_model_len"] == 64 and card["object"] == "model"
        assert card["sampling_defaults"] == {"temperature": 0.2, "top_p": 0.9}
        assert client.get("/v1/models/alias").json() == card
        assert client.post("/tokenize", json={"prompt": "hi"}).json() == {
            "tokens": [104, 105],
            "count": 2,
            "max_model_len": 64,
            "token_strs": None,
        }
        assert client.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
        assert set(client.get("/version").json()) == {"version"}
