"""The memory estimates of export, spec and merge (draftkit/memory_stages.py): each is printed and reported, and
each part is what the run holds (the written layout's bytes, the target's parameters in the compute dtype, the
largest sparse input weight), checked against the real tensors of tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import draftkit.memory_stages as memory_stages
from draftkit.checkpoint import load_model_and_tokenizer
from draftkit.cli import app
from draftkit.export import ExportConfig, _state_dict_for_save, sparse_modules
from draftkit.memory import checkpoint_bytes
from draftkit.memory_stages import export_estimate, spec_estimate
from draftkit.stages import run_stage
from tests._helpers_export_eval import make_sparse_model, single_thread, write_jsonl
from tests.conftest import make_rows

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
LAYOUT = ("shape", "compressed", "bitmask", "row_offsets")


@pytest.fixture(scope="module")
def sparse_src(tiny_llama, tmp_path_factory):
    return make_sparse_model(tiny_llama, tmp_path_factory.mktemp("sparse") / "m", 0.5)


def _printed_host(stderr: str) -> float:
    line = next(x for x in stderr.splitlines() if x.startswith("memory estimate: host "))
    return float(line.split()[3])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_export_estimate_is_the_weights_and_the_layout_it_writes(sparse_src, tmp_path, capsys):
    out = tmp_path / "exported"
    report = run_stage("export", str(sparse_src), ExportConfig(), out=out)
    assert _printed_host(capsys.readouterr().err) == pytest.approx(report["memory_estimate_gb"]["host"], abs=0.006)

    model, _ = load_model_and_tokenizer(str(sparse_src), device="cpu")
    state = _state_dict_for_save(model)
    compressed = list(sparse_modules(model, 0.1))
    est = export_estimate(model, state, compressed)
    stored = load_file(str(out / "model.safetensors"))
    groups = {k.rpartition(".")[0] for k in stored if k.endswith(".bitmask")}
    assert sorted(groups) == sorted(compressed)
    assert est.parts["sparse_layout"] == sum(_nbytes(stored[f"{g}.{p}"]) for g in groups for p in LAYOUT)
    weights = sum(_nbytes(t) for t in load_file(str(sparse_src / "model.safetensors")).values())
    buffers = sum(_nbytes(b) for b in model.buffers())
    assert est.parts["weights"] == weights + buffers and est.parts["cast_copy"] == 0
    in_bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}  # export --dtype bfloat16 of a float32 model
    cast = export_estimate(model, in_bf16, compressed)
    assert cast.parts["cast_copy"] == weights // 2
    assert cast.parts["sparse_layout"] < est.parts["sparse_layout"]


def test_export_hands_back_each_weights_temporaries(sparse_src, tmp_path, monkeypatch):
    """Without it the freed pages of each weight's mask and indices stayed in the heap: the peak of one model's
    export varied by its size from run to run (measured: 1.06 or 2.06 GB for the SmolLM2-135M shape)."""
    import draftkit.memory

    calls = []
    monkeypatch.setattr(draftkit.memory, "release_freed_memory", lambda: calls.append(1))
    report = run_stage("export", str(sparse_src), ExportConfig(), out=tmp_path / "o")
    assert len(calls) == report["compressed_modules"] > 0


def test_spec_estimate_is_the_draft_and_the_target_as_loaded(tiny_llama):
    draft, _ = load_model_and_tokenizer(str(tiny_llama), dtype="float32", device="cpu")
    params = sum(p.numel() for p in {id(p): p for p in draft.parameters()}.values())
    in_bf16 = spec_estimate(draft, str(tiny_llama), compute=torch.bfloat16, trust_remote_code=False)
    buffers = sum(_nbytes(b) for b in draft.buffers())  # rotary frequencies
    assert in_bf16.parts["draft"] == memory_stages.model_bytes(draft) == params * 4 + buffers
    assert in_bf16.parts["target"] == params * 2  # the target's parameters in the compute dtype
    assert in_bf16.parts["target_load"] == checkpoint_bytes(tiny_llama)  # read whole in float32, then cast
    same = spec_estimate(draft, str(tiny_llama), compute=torch.float32, trust_remote_code=False)
    assert same.parts["target"] == checkpoint_bytes(tiny_llama) and same.parts["target_load"] == 0
    assert in_bf16.host - same.host == params * 2


def test_spec_prints_and_reports_its_estimate(tiny_llama, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", make_rows(1, seed=5))
    result = CliRunner().invoke(app, ["spec", str(tiny_llama), "--target", str(tiny_llama), "--prompts", str(prompts),
                                      "--max-new-tokens", "4", "--repeats", "1", "--json", "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    est = json.loads(result.stdout)["memory_estimate_gb"]
    assert set(est) >= {"host", "draft", "target", "target_load"}
    assert _printed_host(result.stderr) == pytest.approx(est["host"], abs=0.006)


def test_merge_estimate_counts_the_largest_sparse_input_weight(tiny_llama, sparse_src, tmp_path, monkeypatch):
    exported = tmp_path / "exported"
    run_stage("export", str(sparse_src), ExportConfig(), out=exported)  # sparse-bitmask: read decompressed
    seen = []
    real = memory_stages.merge_estimate
    monkeypatch.setattr(memory_stages, "merge_estimate", lambda *a: seen.append(a) or real(*a))
    result = CliRunner().invoke(app, ["merge", str(tiny_llama), str(exported), "-o", str(tmp_path / "m"), "--json",
                                      "--masks", "first"])
    assert result.exit_code == 0, result.output
    stored = load_file(str(exported / "model.safetensors"))
    largest = max(int(stored[k].prod()) for k in stored if k.endswith(".shape"))
    from draftkit.merge.runner import CHUNK_ELEMENTS

    assert seen == [(2, CHUNK_ELEMENTS, largest)]
    est = json.loads(result.stdout)["memory_estimate_gb"]
    assert _printed_host(result.stderr) == pytest.approx(est["host"], abs=0.006)
