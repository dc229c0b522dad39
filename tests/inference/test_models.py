"""Model resolution: GGUF files are described once into the cache, safely under concurrent first
uses, and read in place with the values transformers' own GGUF loading gives."""

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from inference import load_block, resolve_model
from inference import models as models_module


def _fake_describe(gguf: Path, out: Path) -> None:
    """Stands in for the real description: slow, and counts its runs in a log beside the GGUF."""
    with open(gguf.parent / "conversions.log", "a") as log:
        log.write("run\n")
    (out / "model.safetensors").write_bytes(b"x" * 1000)
    time.sleep(0.5)  # long enough for the other process to arrive while this one works
    (out / "config.json").write_text(json.dumps({"source": str(gguf)}))


def _resolve_in_child(gguf: str, cache: str, queue) -> None:
    import os

    os.environ["LAYERSWARM_CACHE"] = cache
    models_module._describe_gguf = _fake_describe
    source = resolve_model(gguf)
    queue.put((source.model_id, str(source.path)))


def test_gguf_is_described_once_under_concurrent_first_uses(tmp_path):
    gguf = tmp_path / "tiny-model.gguf"
    gguf.write_bytes(b"GGUF fake")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_resolve_in_child, args=(str(gguf), str(tmp_path / "cache"), queue))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [queue.get(timeout=5) for _ in procs]
    assert len(set(results)) == 1
    model_id, path = results[0]
    assert model_id == "tiny-model"
    assert json.loads((Path(path) / "config.json").read_text())["source"] == str(gguf)
    assert (gguf.parent / "conversions.log").read_text().count("run") == 1
    leftovers = [p.name for p in Path(path).parent.iterdir() if p.name.startswith(".") and p.is_dir()]
    assert leftovers == []  # no half-written temp directory left behind


def test_cuda_asked_on_a_cpu_machine_is_a_clear_error(tiny_llama):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_block(tiny_llama, "0:2", device="cuda")


def test_bfloat16_blocks_run_on_cpu(tiny_llama):
    block = load_block(tiny_llama, "0:4", dtype="bfloat16")
    assert block.dtype == torch.bfloat16
    logits = block("s", torch.tensor([[5, 6, 7]]), 0)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        load_block(tiny_llama, "0:4", dtype="int8")


def test_a_first_download_says_what_it_fetches_and_why_it_failed(tmp_path, monkeypatch, capfd):
    """First use prints what it downloads; a download that fails names pip's reason."""
    from inference.errors import ModelNotFoundError

    monkeypatch.setenv("LAYERSWARM_CACHE", str(tmp_path))
    missing = models_module.BuiltinModel(
        "layerswarm-no-such-model", "9.9.9", "layerswarm_no_such", "x/m.gguf"
    )
    with pytest.raises(ModelNotFoundError, match="cannot download layerswarm-no-such-model==9.9.9: .+"):
        models_module._fetch_builtin(missing)
    err = capfd.readouterr().err
    assert "downloading layerswarm-no-such-model==9.9.9" in err


@pytest.mark.slow
def test_the_default_gguf_read_in_place_equals_transformers_loading(tmp_path, monkeypatch):
    """Every tensor of the built-in model, read from its GGUF by name, equals (value for value)
    what transformers' own GGUF loader gives; the cache holds no weights."""
    from transformers import AutoModelForCausalLM

    from inference.gguf_weights import GgufCheckpoint
    from inference.weights import checkpoint_weights, open_checkpoint
    from inference.whole_model import load_whole_model

    gguf = models_module.builtin_gguf(models_module.DEFAULT_MODEL)
    monkeypatch.setenv("LAYERSWARM_CACHE", str(tmp_path))
    source = resolve_model(str(gguf))
    assert not list(source.path.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in source.path.iterdir()) < gguf.stat().st_size / 10
    checkpoint = open_checkpoint(source.path)
    assert isinstance(checkpoint, GgufCheckpoint)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = reference.state_dict()
    state.pop("lm_head.weight")  # tied: the file has no output.weight, the block reuses the embedding
    assert "lm_head.weight" not in checkpoint and set(checkpoint.files) == set(state)
    got = checkpoint.read(sorted(state))
    unequal = [name for name, t in state.items() if not torch.equal(got[name].float(), t)]
    assert unequal == []
    assert checkpoint_weights(source.path) == sum(t.numel() for t in state.values())
    whole = load_whole_model(source.path)  # the reference tests and benchmarks build, from the GGUF
    tokens = torch.tensor([[1, 504, 3458, 282, 4469, 314]])
    with torch.no_grad():
        assert torch.equal(whole(tokens).logits, reference.eval()(tokens).logits)


def test_a_builtin_whose_gguf_moved_is_described_again(tmp_path, monkeypatch):
    """The built-in's table names the GGUF file it read; when that file is gone (its package
    reinstalled elsewhere, a cache shared across machines), the next resolve describes it again."""
    from inference import resolve_model
    from inference.models import builtin_gguf

    gguf = builtin_gguf("smollm2-135m")
    monkeypatch.setenv("LAYERSWARM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "downloads").mkdir(parents=True)  # (a link this cache finds, not a download)
    (tmp_path / "cache" / "downloads" / gguf.name).symlink_to(gguf)
    first = resolve_model("smollm2-135m").path
    table = json.loads((first / "layerswarm.json").read_text())
    table["gguf"] = str(tmp_path / "gone.gguf")
    (first / "layerswarm.json").write_text(json.dumps(table))
    again = resolve_model("smollm2-135m").path
    assert Path(json.loads((again / "layerswarm.json").read_text())["gguf"]).is_file()
