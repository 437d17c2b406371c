"""Exports of MoE models store the experts as transformers stores them, one 2-D weight per expert and projection
(``mlp.experts.3.gate_proj.weight``): the dense export is what serving engines read, and the sparse-bitmask
export compresses every sparse expert (the format's groups are 2-D), restored exactly by the reader and by
``draftkit decompress``."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import draftkit
from draftkit.cli import app
from draftkit.moe import moe_blocks
from draftkit.stages import LoadConfig, run_stage

runner = CliRunner()


def _experts_half_zero(src, out):
    """``src`` with half of every expert weight zeroed (per expert and projection), saved to ``out``."""
    model = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (b,) in moe_blocks(model).values():
            for w in (b.experts.gate_up_proj, b.experts.down_proj):
                w.mul_(torch.rand(w.shape, generator=g).argsort(dim=-1) >= w.shape[-1] // 2)
    model.save_pretrained(out)
    (out / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).is_file():
            (out / f).write_bytes((src / f).read_bytes())
    return model


def _export(src, fmt, out):
    res = runner.invoke(app, ["export", str(src), "--format", fmt, "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_sparse_export_compresses_every_expert_and_round_trips(arch, tiny_moe_models, tmp_path):
    sparse_src = tmp_path / "sp"
    model = _experts_half_zero(tiny_moe_models[arch], sparse_src)
    dense, sparse = _export(sparse_src, "dense", tmp_path / "dense"), _export(sparse_src, "sparse", tmp_path / "sparse")
    stored = load_file(tmp_path / "sparse" / "model.safetensors")
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    projections = ("w1", "w2", "w3") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for i in range(4):
        for j in range(8):
            for p in projections:  # every expert's every projection compressed, none stored dense
                assert f"model.layers.{i}.{moe}.experts.{j}.{p}.bitmask" in stored
                assert f"model.layers.{i}.{moe}.experts.{j}.{p}.weight" not in stored
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in stored)  # no fused 3-D tensor
    assert sparse["compressed_modules"] == 4 * 8 * 3
    assert sparse["bytes_on_disk"] < 0.8 * dense["bytes_on_disk"]  # the experts are most of the weights
    assert sparse["target_sparsity"] == pytest.approx(0.5)
    # the dense export stores the experts one by one too, as save_pretrained does (what vLLM reads)
    assert load_file(tmp_path / "dense" / "model.safetensors").keys() == load_file(sparse_src / "model.safetensors").keys()
    want = model.state_dict()
    for again in (draftkit.load_model(str(tmp_path / "sparse")), AutoModelForCausalLM.from_pretrained(tmp_path / "dense")):
        got = again.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    res = runner.invoke(app, ["decompress", str(tmp_path / "sparse"), "-o", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    back = load_file(tmp_path / "back" / "model.safetensors")
    ref = load_file(tmp_path / "dense" / "model.safetensors")
    assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)


def test_sparse_moe_export_streams(tiny_moe_models, calib_file, tmp_path):
    """A streamed run reads the compressed experts of a sparse export (decompressed, then fused): the same
    result as from the dense checkpoint."""
    from draftkit.data import CalibConfig
    from draftkit.prune import PruneConfig

    src = tmp_path / "sp"
    _experts_half_zero(tiny_moe_models["qwen3_moe"], src)
    _export(src, "sparse", tmp_path / "sparse")
    cfg = PruneConfig(experts=2, calib=CalibConfig(path=str(calib_file), samples=4, seqlen=32))
    a = run_stage("prune", str(src), cfg, out=tmp_path / "a", load=LoadConfig(stream="on"))
    b = run_stage("prune", str(tmp_path / "sparse"), cfg, out=tmp_path / "b", load=LoadConfig(stream="on"))
    assert a["experts"]["layers"] == b["experts"]["layers"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
