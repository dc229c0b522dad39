"""Shared fixtures: tiny random models of each supported family, saved as safetensors."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import save_tiny_model  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """model_type -> directory of a tiny random model of that family."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny_model(kind, root / kind) for kind in ("llama", "qwen2", "mistral")}


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """model_type -> directory of a tiny random model of that family (tests/helpers.py
    FAMILY_CONFIGS: the family's own features switched on), made at first use."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = save_tiny_model(kind, tmp_path_factory.mktemp("family") / kind)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The real default model (SmolLM2-135M-Instruct), fetched and converted once."""
    from inference import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL).path


# what a test module says when it starts peer processes (tests/peers/processes.py, or a fixture of
# tests/peers/conftest.py or tests/peers/transport/guarded.py that does)
_PROCESS_WORDS = ("tests.peers.processes", "make_swarm", "tiny_swarm", "guarded")


def pytest_collection_modifyitems(config, items):
    """`processes` on the tests of modules that start peer processes: scripts/test --quick leaves
    them out (with `slow`)."""
    starts: dict[str, bool] = {}
    for item in items:
        path = str(item.path)
        if path not in starts:
            text = item.path.read_text()
            starts[path] = any(word in text for word in _PROCESS_WORDS)
        if starts[path]:
            item.add_marker(pytest.mark.processes)
