"""Layer-streamed perplexity (``eval --ppl`` with ``--stream``): the same figure as the resident model on
chat rows (response tokens only) and plain text, one decoder layer materialised at a time, through the CLI
on a sharded checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.errors import InvalidInputError
from draftkit.evaluate import EvalConfig
from draftkit.stages import LoadConfig, run_stage
from tests._helpers_export_eval import write_jsonl
from tests.conftest import make_rows


@pytest.fixture(scope="module")
def ppl_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    text = root / "notes.txt"
    text.write_text("\n\n".join(r["question"] + " " + r["answer"] for r in make_rows(6, seed=41)))
    return {"chat": write_jsonl(root / "qa.jsonl", make_rows(7, seed=42)), "text": text}


def _ppl(model_dir, data, tmp_path, stream: str, **cfg):
    # batch_size 3 over 7 rows: padded batches and a short last one; seqlen 48 / stride 20: partial windows
    config = EvalConfig(ppl=str(data), batch_size=3, ppl_seqlen=48, ppl_stride=20, **cfg)
    return run_stage("eval", str(model_dir), config, out=tmp_path / stream, load=LoadConfig(stream=stream))


@pytest.mark.parametrize("data", ["chat", "text"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_streamed_perplexity_equals_resident(arch, data, tiny_models, ppl_files, tmp_path):
    on = _ppl(tiny_models[arch], ppl_files[data], tmp_path, "on")
    off = _ppl(tiny_models[arch], ppl_files[data], tmp_path, "off")
    assert on.get("streamed") is True and not off.get("streamed")
    a, b = on["tasks"]["perplexity"], off["tasks"]["perplexity"]
    assert a["scored"] == b["scored"] == ("response" if data == "chat" else "all")
    assert a["tokens"] == b["tokens"] > 0
    assert abs(a["perplexity"] - b["perplexity"]) <= 1e-6 * b["perplexity"]
    assert {"weights", "activations", "logits"} <= on["memory_estimate_gb"].keys()


def test_resident_perplexity_tokenizes_the_file_once(tiny_llama, ppl_files, tmp_path, monkeypatch):
    """The batches made for the memory estimate are the ones scored: the file is not read and tokenized again."""
    from draftkit.evaluate import perplexity as ppl_mod
    from draftkit.evaluate import streamed as streamed_mod

    calls = []
    real = ppl_mod.perplexity_batches

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ppl_mod, "perplexity_batches", counted)
    monkeypatch.setattr(streamed_mod, "perplexity_batches", counted)
    off = _ppl(tiny_llama, ppl_files["text"], tmp_path, "off")
    assert not off.get("streamed") and off["tasks"]["perplexity"]["tokens"] > 0
    assert len(calls) == 1


def test_streamed_perplexity_holds_one_layer_at_a_time(tiny_models, ppl_files, tmp_path, monkeypatch):
    """Each decoder layer is read once, when no other layer (nor the embeddings) is materialised; the head
    is read after the last layer is freed; the whole model is never loaded."""
    from draftkit import checkpoint, stages
    from draftkit.engine.layers import StreamedLayers

    def materialised(module) -> bool:
        return any(p.device.type != "meta" for p in module.parameters())

    seen: list[int] = []
    load, load_head = StreamedLayers.load, StreamedLayers.load_head

    def spy_load(self, i):
        assert not any(materialised(layer) for layer in self.layers), f"a layer is still loaded when {i} is read"
        assert not materialised(self.model.get_input_embeddings())
        seen.append(i)
        return load(self, i)

    def spy_head(self):
        assert not any(materialised(layer) for layer in self.layers)
        seen.append(-1)
        return load_head(self)

    def no_whole_model(*a, **k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(StreamedLayers, "load", spy_load)
    monkeypatch.setattr(StreamedLayers, "load_head", spy_head)
    monkeypatch.setattr(stages, "load_model_and_tokenizer", no_whole_model)
    monkeypatch.setattr(checkpoint, "load_model_and_tokenizer", no_whole_model)
    report = _ppl(tiny_models["qwen2"], ppl_files["chat"], tmp_path, "on")
    assert seen == [0, 1, 2, 3, 4, 5, -1]
    assert report["streamed"] and report["tasks"]["perplexity"]["tokens"] > 0


def test_streamed_perplexity_tied_head(tiny_tokenizer_dir, ppl_files, tmp_path):
    """A tied head (stored once, under the embeddings' key) is read back for the scoring."""
    from tests.conftest import make_tied_llama

    src = make_tied_llama(tiny_tokenizer_dir, tmp_path / "tied", layers=2)
    on = _ppl(src, ppl_files["text"], tmp_path, "on")["tasks"]["perplexity"]
    off = _ppl(src, ppl_files["text"], tmp_path, "off")["tasks"]["perplexity"]
    assert abs(on["perplexity"] - off["perplexity"]) <= 1e-6 * off["perplexity"]


def _sharded(src, dst):
    model = AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(dst, max_shard_size="300KB")
    for f in src.glob("tokenizer*"):
        (dst / f.name).write_bytes(f.read_bytes())
    assert len(list(dst.glob("model-*.safetensors"))) >= 2
    return dst


def test_eval_ppl_cli_streams_a_sharded_checkpoint(tiny_llama, ppl_files, tmp_path, monkeypatch):
    from draftkit.engine import placement as streamed

    model = _sharded(tiny_llama, tmp_path / "sharded")
    runner = CliRunner()
    args = ["eval", str(model), "--ppl", str(ppl_files["chat"]), "--batch-size", "3", "--json"]
    r = runner.invoke(app, [*args, "--stream", "on"])
    assert r.exit_code == 0, r.output
    on = json.loads(r.stdout)
    assert on["streamed"] is True and "streamed one layer at a time" in r.stderr and "memory estimate" in r.stderr
    off = json.loads(runner.invoke(app, [*args, "--stream", "off"]).stdout)
    assert "streamed" not in off
    assert abs(on["tasks"]["perplexity"]["perplexity"] - off["tasks"]["perplexity"]["perplexity"]) <= (
        1e-6 * off["tasks"]["perplexity"]["perplexity"])
    # --stream auto follows the other stages' rule: a checkpoint above the threshold streams
    monkeypatch.setattr(streamed, "STREAM_ABOVE_BYTES", 0)
    auto = json.loads(runner.invoke(app, args).stdout)
    assert auto["streamed"] is True
    assert auto["tasks"]["perplexity"]["perplexity"] == on["tasks"]["perplexity"]["perplexity"]


def test_bad_streamed_eval_input_is_one_line(tiny_llama, ppl_files, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from draftkit import memory

    r = CliRunner().invoke(app, ["eval", str(tiny_llama), "--ppl", str(ppl_files["text"]), "--tasks", "tiny-arith",
                                 "--stream", "on", "-o", str(tmp_path / "rep")])
    assert r.exit_code == 2 and "--stream on streams eval --ppl alone" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "rep").exists()
    d = tmp_path / "bin"  # a .bin checkpoint cannot be streamed
    d.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_llama / "model.safetensors"), d / "pytorch_model.bin")
    with pytest.raises(InvalidInputError, match="needs a local safetensors checkpoint"):
        _ppl(d, ppl_files["text"], tmp_path, "on")
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 100 * 2**20)  # too large, and not streamable
    with pytest.raises(InvalidInputError, match="not safetensors, so it cannot be streamed"):
        _ppl(d, ppl_files["text"], tmp_path, "auto")
    assert not (tmp_path / "auto").exists()


def test_streamed_baseline_perplexity(tiny_models, ppl_files, tmp_path, monkeypatch):
    """With --baseline, a perplexity-only evaluation measures the baseline by the same rule (streamed here)."""
    from draftkit import checkpoint
    from draftkit.engine import placement as streamed

    def no_whole_model(*a, **k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setenv("DRAFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(streamed, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr(checkpoint, "load_model_and_tokenizer", no_whole_model)
    src = tiny_models["gemma2"]
    report = _ppl(src, ppl_files["chat"], tmp_path, "auto", baseline=str(src), min_recovery=0.999)
    assert report["streamed"] and report["recovery"]["perplexity"] == 1.0 and report["gate"]["passed"]


@pytest.mark.gpu
def test_streamed_perplexity_on_gpu_holds_one_layer(tiny_models, ppl_files, tmp_path):
    """On a GPU only the current layer (the embeddings while capturing, the head while scoring) is on the
    device; the perplexity matches the CPU run up to float summation order."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from draftkit.checkpoint import LazyCheckpoint

    src = tiny_models["llama"]
    cfg = EvalConfig(ppl=str(ppl_files["chat"]), batch_size=3)
    cpu = run_stage("eval", str(src), cfg, out=tmp_path / "cpu", load=LoadConfig(stream="on", device="cpu"))
    torch.cuda.reset_peak_memory_stats()
    gpu = run_stage("eval", str(src), cfg, out=tmp_path / "gpu", load=LoadConfig(stream="on", device="cuda"))
    assert gpu["streamed"]
    ckpt = LazyCheckpoint(src)
    layer0 = ckpt.nbytes(k for k in ckpt.keys() if k.startswith("model.layers.0."))
    embed = ckpt.nbytes(["model.embed_tokens.weight"])
    assert torch.cuda.max_memory_allocated() < embed + 3 * layer0 + 8 * 2**20
    a, b = gpu["tasks"]["perplexity"]["perplexity"], cpu["tasks"]["perplexity"]["perplexity"]
    assert abs(a - b) <= 1e-4 * b
