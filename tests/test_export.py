"""Export: the sparse-bitmask layout round-trips bit-exactly (checked by an independent decoder), its size
matches the layout's theory, dense exports reload with plain transformers, bad input fails cleanly."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

import draftkit
from draftkit.bitmask import bitmask_compress, bitmask_decompress, theoretical_layout_bytes
from draftkit.cli import app
from draftkit.export import ExportConfig
from draftkit.stages import run_stage
from tests._helpers_export_eval import (
    decode_bitmask_reference,
    make_sparse_model,
    single_thread,
    sparsify_in_place,
)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 40, 77]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("cols", [13, 16, 64])
def test_bitmask_layout_matches_reference_decoder(cols):
    torch.manual_seed(cols)
    w = torch.randn(7, cols)
    w[torch.rand_like(w) < 0.6] = 0
    w[2] = 0  # an empty row
    t = bitmask_compress(w)
    assert t["shape"].dtype == torch.int64 and t["shape"].tolist() == [7, cols]
    assert t["bitmask"].dtype == torch.uint8 and tuple(t["bitmask"].shape) == (7, math.ceil(cols / 8))
    assert t["row_offsets"].dtype == torch.int64 and t["row_offsets"].tolist()[0] == 0
    assert t["compressed"].numel() == int((w != 0).sum())
    # bit order: column 0 is the least significant bit of the first byte
    first = int(t["bitmask"][0, 0])
    assert [(first >> b) & 1 for b in range(8)] == (w[0, :8] != 0).int().tolist()
    assert torch.equal(decode_bitmask_reference(t["shape"], t["compressed"], t["bitmask"], t["row_offsets"]), w)
    assert torch.equal(bitmask_decompress(t["compressed"], t["bitmask"], t["shape"]), w)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparse_export_round_trips_bit_exactly(pattern, tiny_llama, tmp_path):
    src = make_sparse_model(tiny_llama, tmp_path / "sparse-src", 0.5, pattern)
    out = tmp_path / "exported"
    report = run_stage("export", str(src), ExportConfig(), out=out)
    assert report["format"] == "sparse"
    assert report["sparsity_structure"] == pattern
    assert report["compressed_modules"] == 6 * 7

    original = load_file(str(src / "model.safetensors"))
    stored = load_file(str(out / "model.safetensors"))
    compressed = sorted(k[: -len(".bitmask")] for k in stored if k.endswith(".bitmask"))
    assert len(compressed) == 42 and all(".layers." in m for m in compressed)
    for m in compressed:
        assert f"{m}.weight" not in stored
        dense = decode_bitmask_reference(stored[f"{m}.shape"], stored[f"{m}.compressed"], stored[f"{m}.bitmask"],
                                         stored[f"{m}.row_offsets"])
        assert torch.equal(dense, original[f"{m}.weight"])
    for k, v in original.items():  # every other tensor stored as it is
        if k[: -len(".weight")] not in compressed:
            assert torch.equal(stored[k], v)

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["version"] == "0.14.0"
    sc = qc["sparsity_config"]
    assert sc["format"] == "sparse-bitmask" and sc["sparsity_structure"] == pattern
    assert sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"]
    assert 0 < sc["global_sparsity"] < 0.5
    assert (out / "README.md").read_text().count("draftkit decompress") == 1
    assert json.loads((out / "draftkit.json").read_text())["stage"] == "export"

    ref = AutoModelForCausalLM.from_pretrained(src)
    assert torch.equal(logits(draftkit.load_model(out)), logits(ref))
    result = CliRunner().invoke(app, ["decompress", str(out), "-o", str(tmp_path / "dense"), "--json"])
    assert result.exit_code == 0, result.output
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # plain transformers
    assert torch.equal(logits(dense), logits(ref))
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_size_on_disk_matches_layout_theory(sparsity, tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    sparsify_in_place(model, sparsity)
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    report = run_stage("export", str(tmp_path / "src"), ExportConfig(format="sparse"), out=tmp_path / "out")
    assert report["target_sparsity"] == pytest.approx(sparsity, abs=0.002)
    disk = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert report["bytes_on_disk"] == disk
    # theory: non-zeros + bitmask + row offsets + shape per compressed weight, other tensors dense
    theory = 0.0
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings: stored once
        if p.ndim == 2 and ".layers." in name:
            theory += theoretical_layout_bytes(p.shape, float((p == 0).float().mean()), 4)
        else:
            theory += p.numel() * 4
    assert report["theoretical_bytes"] == pytest.approx(theory, rel=1e-6)
    assert abs(disk / theory - 1) < 0.02
    assert report["ratio_to_dense"] < 1 - sparsity + 0.1


def test_dense_export_reloads_with_identical_logits_and_shards(tiny_llama, tmp_path):
    src = make_sparse_model(tiny_llama, tmp_path / "src", 0.5)
    out = tmp_path / "dense"
    report = run_stage("export", str(src), ExportConfig(format="dense", max_shard_size="100KB"), out=out)
    assert report["format"] == "dense" and len(report["files"]) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report["files"])
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(model), logits(AutoModelForCausalLM.from_pretrained(src)))
    assert report["bytes_on_disk"] >= report["dense_bytes"]


def test_dense_export_dtype(tiny_llama, tmp_path):
    out = tmp_path / "bf16"
    result = CliRunner().invoke(app, ["export", str(tiny_llama), "-o", str(out), "--format", "dense", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())
    assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_export_prints_load_and_serve_lines(tiny_llama, tmp_path):
    src = make_sparse_model(tiny_llama, tmp_path / "src", 0.5)
    result = CliRunner().invoke(app, ["export", str(src), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "draftkit.load_model" in result.output and "draftkit decompress" in result.output


def test_sparse_export_of_dense_model_fails_in_one_line(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", str(tiny_llama), "-o", str(out), "--format", "sparse"])
    assert result.exit_code == 2
    assert "--format dense" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_decompress_rejects_dense_checkpoint(tiny_llama, tmp_path):
    result = CliRunner().invoke(app, ["decompress", str(tiny_llama), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not a sparse-bitmask checkpoint" in result.output


def test_sparsify_helper_is_exact(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    sparsify_in_place(model, 0.5, "2:4")
    from draftkit.sparsify.masks import is_nm_sparse, target_linears

    assert all(is_nm_sparse(lin.weight, 2, 4) for lin in target_linears(model).values())


def test_import_draftkit_stays_light():
    code = "import sys, draftkit; assert 'torch' not in sys.modules, 'torch imported'; print(callable(draftkit.load_model))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_stages_registered_with_strict_configs():
    from pydantic import ValidationError

    from draftkit.stages import stages

    reg = stages()
    assert reg["export"].save is not None and callable(reg["export"].save)
    assert reg["eval"].save == "report" and reg["spec"].save == "report"
    for name, good in (("export", {}), ("eval", {"tasks": ["tiny-arith"]}), ("spec", {"target": "t", "prompts": "p"})):
        reg[name].config(**good)
        with pytest.raises(ValidationError):
            reg[name].config(**good, unknown_setting=1)
    with pytest.raises(ValidationError):
        reg["spec"].config(target="t", prompts="p", k=0)


def test_run_report_table_shows_export_sizes_and_eval_results(tiny_llama, tmp_path):
    """report.md's headline columns read keys the stages' reports really have (sizes, task results)."""
    from draftkit.report import stage_metrics

    src = make_sparse_model(tiny_llama, tmp_path / "src", 0.5)
    report = run_stage("export", str(src), ExportConfig(format="sparse"), out=tmp_path / "out")
    assert list(stage_metrics("export", report))[:4] == ["format", "bytes_on_disk", "dense_bytes", "ratio_to_dense"]
    evaluated = {"tasks": {"perplexity": {"perplexity": 12.5}}, "primary": {"perplexity": "perplexity"},
                 "baseline": {"model": "b", "tasks": {}, "cached": False}, "recovery": {"perplexity": 0.9},
                 "mean_recovery": 0.9}  # the keys of draftkit.evaluate.evaluate's report
    assert list(stage_metrics("eval", evaluated))[:3] == ["mean_recovery", "recovery", "tasks"]
