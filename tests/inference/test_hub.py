"""A Hugging Face Hub repo id as a model: resolution fetches only the small files, a block fetches
only the shards that hold its layers, and offline the cache serves (or the missing file is named).
The Hub is a real HTTP server on loopback serving the resolve endpoints (HF_ENDPOINT)."""

import hashlib
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from safetensors.torch import load_file, save_file

from tests.helpers import save_tiny_model

REPO, COMMIT = "acme/tiny-llama", "0123456789abcdef0123456789abcdef01234567"


def shard_per_layer(path) -> None:
    """Rewrite the saved model as one shard per decoder layer plus one for the rest, with an index."""
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    groups: dict[str, dict] = {}
    for name, t in tensors.items():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[name] = t
    weight_map = {}
    for key, group in groups.items():
        file = f"model-{key}.safetensors"
        save_file(group, path / file)
        weight_map.update(dict.fromkeys(group, file))
    total = sum(t.numel() for t in tensors.values())
    index = {"metadata": {"total_parameters": total, "total_size": total * 4}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def fake_hub(root, requested: Counter) -> FastAPI:
    app = FastAPI()

    @app.api_route("/{org}/{name}/resolve/{revision}/{file:path}", methods=["GET", "HEAD"])
    def resolve(org: str, name: str, revision: str, file: str, request: Request) -> Response:
        local = root / file
        if f"{org}/{name}" != REPO or not local.is_file():
            return Response(status_code=404, headers={"X-Error-Code": "EntryNotFound"})
        body = local.read_bytes()
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
            "Content-Length": str(len(body)),
        }
        if request.method == "HEAD":
            return Response(headers=headers)
        ranged = request.headers.get("range", "")
        if ranged.startswith("bytes="):  # a header read: counted apart from downloads
            first, last = (int(x) for x in ranged[len("bytes=") :].split("-"))
            requested[f"{file} (range)"] += 1
            part = body[first : last + 1]
            headers["Content-Length"] = str(len(part))
            headers["Content-Range"] = f"bytes {first}-{first + len(part) - 1}/{len(body)}"
            return Response(part, status_code=206, headers=headers)
        requested[file] += 1
        return Response(body, headers=headers)

    return app


@pytest.fixture
def serve():
    """root directory -> (endpoint, files requested) of a Hub serving it as REPO; stopped after."""
    servers = []

    def start(root):
        requested: Counter = Counter()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(fake_hub(root, requested), port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        while not server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}", requested

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def hub(tmp_path, serve):
    root = save_tiny_model("llama", tmp_path / "repo")
    shard_per_layer(root)
    endpoint, requested = serve(root)
    return endpoint, root, requested


PROBE = """
import json, sys
from inference import resolve_model
from inference.weights import checkpoint_weights, open_checkpoint

source = resolve_model({repo!r})
checkpoint = open_checkpoint(source.path)
names = [n for n in checkpoint.files if n.startswith("model.layers.{layer}.")]
try:
    tensors = checkpoint.read(names)
except Exception as e:
    print(json.dumps({{"error": f"{{type(e).__name__}}: {{e}}"}}))
    sys.exit(0)
sums = {{n: float(t.double().sum()) for n, t in tensors.items()}}
print(json.dumps({{"model_id": source.model_id, "weights": checkpoint_weights(source.path), "sums": sums}}))
"""


def run_probe(tmp_path, endpoint: str, layer: int, offline: bool) -> dict:
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_ENDPOINT": endpoint,
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "LAYERSWARM_CACHE": str(tmp_path / "ls-cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    probe = textwrap.dedent(PROBE.format(repo=REPO, layer=layer))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_peer_fetches_only_the_shards_of_its_layers(tmp_path, hub):
    endpoint, root, requested = hub
    got = run_probe(tmp_path, endpoint, layer=1, offline=False)
    assert got["model_id"] == REPO
    originals = load_file(root / "model-1.safetensors")
    assert got["sums"] == {n: float(t.double().sum()) for n, t in originals.items()}
    index = json.loads((root / "model.safetensors.index.json").read_text())
    assert got["weights"] == index["metadata"]["total_parameters"]
    shards = {f for f in requested if f.endswith(".safetensors")}
    assert shards == {"model-1.safetensors"}  # no other layer's shard, and no header reads of them
    assert requested["config.json"] == 1 and requested["model.safetensors.index.json"] == 1

    cached = run_probe(tmp_path, "http://127.0.0.1:9", layer=1, offline=True)  # no Hub at all
    assert cached["sums"] == got["sums"]
    missing = run_probe(tmp_path, "http://127.0.0.1:9", layer=2, offline=True)
    assert "WeightFileError" in missing["error"] and "model-2.safetensors" in missing["error"]
    assert "not in the Hugging Face cache" in missing["error"]


@pytest.mark.slow
def test_a_single_file_repo_is_indexed_from_its_header_alone(tmp_path, serve):
    root = save_tiny_model("llama", tmp_path / "repo")
    endpoint, requested = serve(root)
    got = run_probe(tmp_path, endpoint, layer=0, offline=False)
    originals = load_file(root / "model.safetensors")
    assert got["weights"] == sum(t.numel() for t in originals.values())
    assert got["sums"] == {n: float(t.double().sum()) for n, t in originals.items() if ".layers.0." in n}
    assert requested["model.safetensors (range)"] >= 1  # the names came from the header
    assert requested["model.safetensors"] == 1  # then the one file, once, for the layer


def test_an_unknown_repo_offline_names_the_missing_file(tmp_path, monkeypatch):
    from inference import ModelNotFoundError, resolve_model

    monkeypatch.setenv("LAYERSWARM_CACHE", str(tmp_path))
    with pytest.raises(
        ModelNotFoundError, match="config.json of acme/no-such-model is not in the Hugging Face cache"
    ):
        resolve_model("acme/no-such-model")
