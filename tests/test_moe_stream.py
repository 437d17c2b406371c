"""Streaming MoE checkpoints one decoder layer at a time: per-expert tensors on disk, fused 3-D parameters in the
model (transformers' conversion mapping both ways). The streamed sparsify and expert prune write the very bytes
the resident runs write (same keys, same per-expert layout), reload with plain ``from_pretrained``, and never
hold more than one decoder layer."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from draftkit.checkpoint import SAFE_INDEX, LazyCheckpoint
from draftkit.data import CalibConfig
from draftkit.engine.layers import StreamedLayers
from draftkit.moe import moe_blocks
from draftkit.prune import PruneConfig
from draftkit.sparsify import SparsifyConfig
from draftkit.stages import LoadConfig, run_stage


def _stored(path):
    out = {}
    index = path / SAFE_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    for f in files:
        out.update(load_file(path / f))
    return out


def _identical(a, b):
    """Both outputs hold the same stored tensors, bit for bit (same names: the per-expert layout)."""
    wa, wb = _stored(a), _stored(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:3]
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    return wa


def _untimed(modules):
    return {n: {k: v for k, v in e.items() if k != "seconds"} for n, e in modules.items()}


def _both(stage, src, cfg, tmp_path, compute="auto"):
    reports = {mode: run_stage(stage, str(src), cfg, out=tmp_path / mode, load=LoadConfig(stream=mode, compute=compute))
               for mode in ("off", "on")}
    assert reports["on"]["streamed"] is True and not reports["off"].get("streamed")
    return reports


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize(("method", "compute"), [("sparsegpt", "float32"), ("sparsegpt", "bfloat16"),
                                                 ("wanda", "bfloat16"), ("magnitude", "float32")])
def test_streamed_moe_sparsify_equals_resident(arch, method, compute, tiny_moe_models, calib_file, tmp_path):
    cfg = SparsifyConfig(method=method, sparsity=0.5, calib=CalibConfig(path=str(calib_file), samples=6, seqlen=48))
    reports = _both("sparsify", tiny_moe_models[arch], cfg, tmp_path, compute)
    stored = _identical(tmp_path / "on", tmp_path / "off")
    on, off = reports["on"], reports["off"]
    assert on["sparsity"] == off["sparsity"] and on["experts"] == off["experts"]
    assert _untimed(on["modules"]) == _untimed(off["modules"])
    assert on["experts"]["sparsity"] == pytest.approx(0.5, abs=0.01)  # the experts were pruned, streamed too
    names = ("block_sparse_moe.experts.5.w1", "block_sparse_moe.experts.5.w3") if arch == "mixtral" else \
        ("mlp.experts.5.gate_proj", "mlp.experts.5.up_proj")
    w = torch.cat([stored[f"model.layers.2.{n}.weight"] for n in names])  # written per expert, as save_pretrained does
    assert int((w == 0).sum()) == w.numel() // 2


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"])
def test_streamed_expert_prune_equals_resident(arch, tiny_moe_models, calib_file, tmp_path):
    cfg = PruneConfig(experts=0.5, calib=CalibConfig(path=str(calib_file), samples=6, seqlen=48))
    reports = _both("prune", tiny_moe_models[arch], cfg, tmp_path)
    stored = _identical(tmp_path / "on", tmp_path / "off")
    on, off = reports["on"], reports["off"]
    assert on["experts"] == off["experts"] and on["experts"]["experts_after"] == 4
    assert (on["params_before"], on["params_after"]) == (off["params_before"], off["params_after"])
    assert not any(re.search(r"\.experts\.[4-7]\.", k) for k in stored)  # experts renumbered 0-3
    before, after = (AutoModelForCausalLM.from_pretrained(p) for p in (tiny_moe_models[arch], tmp_path / "on"))
    for i, (b,) in moe_blocks(after).items():
        kept = on["experts"]["layers"][f"model.layers.{i}.{b.name}"]["kept"]
        (a,) = moe_blocks(before)[i]
        assert torch.equal(b.experts.gate_up_proj, a.experts.gate_up_proj[kept])
        assert torch.equal(b.router.weight, a.router.weight[kept])


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_streamed_experts_and_layers_in_one_pass(arch, tiny_moe_models, calib_file, tmp_path, monkeypatch):
    from draftkit.engine import layers as streamed

    monkeypatch.setattr(streamed, "SHARD_BYTES", 150_000)  # several shards, with an index
    cfg = PruneConfig(experts=2, layers=1, calib=CalibConfig(path=str(calib_file), samples=6, seqlen=48))
    reports = _both("prune", tiny_moe_models[arch], cfg, tmp_path)
    assert (tmp_path / "on" / SAFE_INDEX).is_file()
    _identical(tmp_path / "on", tmp_path / "off")
    on, off = reports["on"], reports["off"]
    assert on["dropped_layers"] == off["dropped_layers"] and len(on["dropped_layers"]) == 1
    assert on["block_influence"] == off["block_influence"] and on["experts"] == off["experts"]
    assert on["params_after"] == off["params_after"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "on")
    assert [b.num_experts for (b,) in moe_blocks(model).values()] == [6, 6, 6]


def test_streamed_moe_run_holds_one_layer(tiny_moe_models, calib_file, tmp_path, monkeypatch):
    """Every read from the checkpoint is of one decoder layer (or of what lies outside the layers), and when a
    layer is loaded no other layer holds weights: the streamed run never held the whole model."""
    loads, reads = [], []
    load, read = StreamedLayers.load, LazyCheckpoint.read

    def spy_load(self, i):
        layer = load(self, i)
        loads.append([j for j, l in enumerate(self.layers) if any(p.device.type != "meta" for p in l.parameters())])
        return layer

    def spy_read(self, keys, **kw):
        keys = list(keys)
        reads.append({int(m[1]) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))})
        return read(self, keys, **kw)

    monkeypatch.setattr(StreamedLayers, "load", spy_load)
    monkeypatch.setattr(LazyCheckpoint, "read", spy_read)
    calib = CalibConfig(path=str(calib_file), samples=4, seqlen=32)
    run_stage("sparsify", str(tiny_moe_models["qwen3_moe"]), SparsifyConfig(sparsity=0.5, calib=calib),
              out=tmp_path / "s", load=LoadConfig(stream="on"))
    assert loads == [[0], [1], [2], [3]]
    run_stage("prune", str(tiny_moe_models["mixtral"]), PruneConfig(experts=0.5, calib=calib), out=tmp_path / "p",
              load=LoadConfig(stream="on"))
    assert loads[4:] == [[0], [1], [2], [3]]
    assert all(len(r) <= 1 for r in reads) and {i for r in reads for i in r} == {0, 1, 2, 3}
    runs = [r for n, r in enumerate(reads) if r and (n == 0 or r != reads[n - 1])]
    # layer after layer: sparsify reads each once; prune reads each to score it, then again to write it
    assert runs == [{i} for i in range(4)] * 3


def test_stream_auto_keeps_small_moe_resident(tiny_moe_models, calib_file, tmp_path):
    """``auto`` streams by size: a tiny MoE checkpoint runs resident (and ``--stream on`` is no longer refused)."""
    cfg = SparsifyConfig(method="magnitude", sparsity=0.5)
    assert run_stage("sparsify", str(tiny_moe_models["olmoe"]), cfg, out=tmp_path / "a",
                     load=LoadConfig(stream="auto"))["streamed"] is False


def test_fused_keys_on_disk_stream_too(tiny_moe_models, calib_file, tmp_path):
    """A checkpoint that stores the fused parameters under the model's names (draftkit 0.2's exports did) is read
    as it is, its experts removed, and written in its own layout, as the resident run's save_pretrained does."""
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "fused"
    shutil.copytree(tiny_moe_models["qwen3_moe"], src)
    model = AutoModelForCausalLM.from_pretrained(src)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src / "model.safetensors", metadata={"format": "pt"})
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(src / "model.safetensors")
    cfg = PruneConfig(experts=2, calib=CalibConfig(path=str(calib_file), samples=4, seqlen=32))
    reports = _both("prune", src, cfg, tmp_path)
    assert reports["on"]["experts"] == reports["off"]["experts"]
    stored = _identical(tmp_path / "on", tmp_path / "off")
    assert stored["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 6


def test_streamed_recipe_prunes_experts_then_sparsifies(tiny_moe_models, calib_file, tmp_path):
    """``load: {stream: on}`` in a recipe: prune (experts and a block) then Wanda, each stage streamed, the
    final checkpoint the resident recipe's bit for bit."""
    import yaml

    from draftkit.pipeline import run
    from draftkit.recipe import load_recipe

    calib = {"path": str(calib_file), "samples": 6, "seqlen": 48}
    outs = {}
    for stream in ("off", "on"):
        recipe = tmp_path / f"{stream}.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": stream, "model": str(tiny_moe_models["olmoe"]), "output": str(tmp_path / stream),
            "load": {"stream": stream},
            "stages": [{"prune": {"layers": 1, "experts": 0.25, "expert_method": "ean", "calib": calib}},
                       {"sparsify": {"method": "wanda", "sparsity": 0.5, "calib": calib}}]}, sort_keys=False))
        outs[stream] = run(load_recipe(str(recipe)))
        assert [s["report"].get("streamed", False) for s in outs[stream]["stages"]] == [stream == "on"] * 2
    assert outs["on"]["stages"][0]["report"]["experts"] == outs["off"]["stages"][0]["report"]["experts"]
    _identical(tmp_path / "on" / "01-sparsify", tmp_path / "off" / "01-sparsify")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "on" / "01-sparsify")
    assert final.config.num_experts == 6 and final.config.num_hidden_layers == 3


def test_streamed_estimate_holds_the_layer_and_its_fused_experts_being_built():
    """Streamed, an MoE layer's weights are counted with the per-expert tensors its largest fused expert parameter
    is built from (held until the fused copy is whole)."""
    import copy

    from draftkit.memory import estimate_memory
    from tests.conftest import tiny_moe_config

    moe = tiny_moe_config("qwen3_moe", 400)
    dense = copy.deepcopy(moe)
    dense.num_experts = 0
    kw = dict(ckpt_bytes=4 * 10**6, streamed=True, device=torch.device("cpu"), tokens=512, seqlen=64,
              chunk_tokens=512, sparsegpt=False)
    extra = estimate_memory(moe, **kw).parts["weights"] - estimate_memory(dense, **kw).parts["weights"]
    assert extra == 8 * (2 * 32) * 64 * 4  # E x 2I x H float32
    kw["streamed"] = False  # resident: from_pretrained holds every layer's per-expert tensors and fused copies
    extra = estimate_memory(moe, **kw).parts["weights"] - estimate_memory(dense, **kw).parts["weights"]
    assert extra == 4 * 8 * 3 * 32 * 64 * 4  # layers x E x 3I x H float32
