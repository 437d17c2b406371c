"""A recipe runs each stage exactly as its command does: the streaming rule (``load.stream``), the memory
estimate and its "cannot fit" line, and a model handed on in memory only while it fits comfortably."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import draftkit.stages
from draftkit import memory
from draftkit.engine import layers as layerwise
from draftkit.errors import InvalidInputError
from draftkit.pipeline import run
from draftkit.recipe import load_recipe


def _recipe(tmp_path, model, calib, stream: str, name: str, **load) -> str:
    calib_cfg = {"path": str(calib), "samples": 6, "seqlen": 48}
    data = {
        "name": name, "model": str(model), "output": str(tmp_path / name), "load": {"stream": stream, **load},
        "stages": [{"prune": {"layers": 2, "calib": calib_cfg}},
                   {"sparsify": {"method": "wanda", "sparsity": 0.5, "calib": calib_cfg}}],
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(p)


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _count_loads(monkeypatch) -> list[str]:
    """Every whole-model load the stages make (by name)."""
    calls: list[str] = []
    real = draftkit.stages.load_model_and_tokenizer

    def counting(name, **kw):
        calls.append(name)
        return real(name, **kw)

    monkeypatch.setattr(draftkit.stages, "load_model_and_tokenizer", counting)
    return calls


def test_stream_on_in_a_recipe_streams_and_matches_stream_off(tiny_llama, calib_file, tmp_path, monkeypatch):
    off = run(load_recipe(_recipe(tmp_path, tiny_llama, calib_file, "off", "off")))
    assert [s["report"].get("streamed", False) for s in off["stages"]] == [False, False]

    # stream: on: the whole model is never built (no from_pretrained, no whole-model load) and at most one
    # decoder layer holds real weights at any time
    def whole(*a, **k):
        raise AssertionError("a whole model was loaded")

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(draftkit.stages, "load_model_and_tokenizer", whole)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", whole)
    live: set[int] = set()
    most = [0]
    real_load, real_done = layerwise.StreamedLayers.load, layerwise.StreamedLayers.done

    def load(self, i):
        live.add(i)
        most[0] = max(most[0], len(live))
        return real_load(self, i)

    def done(self, i):
        live.discard(i)
        return real_done(self, i)

    monkeypatch.setattr(layerwise.StreamedLayers, "load", load)
    monkeypatch.setattr(layerwise.StreamedLayers, "done", done)
    on = run(load_recipe(_recipe(tmp_path, tiny_llama, calib_file, "on", "on")))
    assert [s["report"]["streamed"] for s in on["stages"]] == [True, True]
    assert most[0] == 1
    assert on["stages"][0]["report"]["dropped_layers"] == off["stages"][0]["report"]["dropped_layers"]
    assert on["stages"][0]["report"]["block_influence"] == off["stages"][0]["report"]["block_influence"]
    a, b = _tensors(tmp_path / "on" / "01-sparsify"), _tensors(tmp_path / "off" / "01-sparsify")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), k  # same masks
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6 * (float(b[k].abs().max()) or 1.0)), k
    assert json.loads((tmp_path / "on" / "01-sparsify" / "config.json").read_text())["num_hidden_layers"] == 4


def test_small_model_passes_in_memory_else_next_stage_reads_the_output(tiny_llama, calib_file, tmp_path, monkeypatch):
    calls = _count_loads(monkeypatch)  # float32 weights read as bfloat16: converted, in memory of the model's own
    run(load_recipe(_recipe(tmp_path, tiny_llama, calib_file, "off", "kept", dtype="bfloat16")))
    assert calls == [str(tiny_llama)]  # the pruned model went on to sparsify in memory

    calls.clear()
    monkeypatch.setattr("draftkit.pipeline.fits_comfortably", lambda model: False)
    run(load_recipe(_recipe(tmp_path, tiny_llama, calib_file, "off", "reread", dtype="bfloat16")))
    assert calls == [str(tiny_llama), str(tmp_path / "reread" / "00-prune")]
    a, b = _tensors(tmp_path / "kept" / "01-sparsify"), _tensors(tmp_path / "reread" / "01-sparsify")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_mapped_from_its_file_is_not_handed_on(tiny_llama, calib_file, tmp_path, monkeypatch):
    """A safetensors checkpoint is mapped, not copied: a model handed on would keep every page of the input
    file any stage touched (the dropped layers' too); the next stage maps the saved output instead."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert memory.maps_a_file(model) and not memory.fits_comfortably(model)
    for p in model.parameters():
        p.data = p.data.clone()
    assert not memory.maps_a_file(model) and memory.fits_comfortably(model)

    calls = _count_loads(monkeypatch)
    run(load_recipe(_recipe(tmp_path, tiny_llama, calib_file, "off", "mapped")))
    assert calls == [str(tiny_llama), str(tmp_path / "mapped" / "00-prune")]


def test_a_stage_that_cannot_fit_stops_before_any_work(tiny_llama, calib_file, tmp_path, monkeypatch):
    calls = _count_loads(monkeypatch)
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 2**20)
    with pytest.raises(InvalidInputError, match=r"^00-prune: this run needs about .* GB of host memory"):
        run(load_recipe(_recipe(tmp_path, tiny_llama, calib_file, "auto", "small")))
    assert calls == [] and not (tmp_path / "small" / "00-prune").exists()


def test_recipe_prints_the_estimate_the_command_prints(tiny_llama, calib_file, tmp_path, capsys):
    from draftkit.prune import PruneConfig
    from draftkit.stages import LoadConfig, run_stage

    run(load_recipe(_recipe(tmp_path, tiny_llama, calib_file, "off", "r")))
    recipe_lines = [line for line in capsys.readouterr().err.splitlines() if "memory estimate" in line]
    cfg = PruneConfig(layers=2, calib={"path": str(calib_file), "samples": 6, "seqlen": 48})
    run_stage("prune", str(tiny_llama), cfg, out=tmp_path / "cmd", load=LoadConfig(stream="off"))
    command_lines = [line for line in capsys.readouterr().err.splitlines() if "memory estimate" in line]
    assert len(recipe_lines) == 2 and recipe_lines[0] == command_lines[0]
