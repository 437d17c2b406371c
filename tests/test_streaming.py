"""Layer streaming: the streamed prune and sparsify give the resident path's results, write shards that
plain transformers reloads, and stop with one line on broken checkpoints."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from draftkit.checkpoint import SAFE_INDEX, LazyCheckpoint
from draftkit.checkpoint.stream import ShardWriter
from draftkit.data import CalibConfig
from draftkit.errors import InvalidInputError, ModelLoadError, NonFiniteError
from draftkit.prune import PruneConfig
from draftkit.sparsify import SparsifyConfig
from draftkit.stages import LoadConfig, run_stage


def _weights(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), k  # same masks
        den = float(b[k].abs().max()) or 1.0
        assert float((a[k] - b[k]).abs().max()) <= 1e-6 * den, k


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_streamed_sparsify_equals_resident(arch, method, compute, tiny_models, calib_file, tmp_path):
    cfg = SparsifyConfig(method=method, sparsity=0.5, calib=CalibConfig(path=str(calib_file), samples=6, seqlen=48))
    reports = {}
    for mode in ("off", "on"):
        reports[mode] = run_stage("sparsify", str(tiny_models[arch]), cfg, out=tmp_path / mode,
                                  load=LoadConfig(stream=mode, compute=compute))
        assert reports[mode]["compute"] == compute
    assert reports["on"]["streamed"] is True and not reports["off"]["streamed"]
    _same(_weights(tmp_path / "on"), _weights(tmp_path / "off"))
    assert reports["on"]["sparsity"] == pytest.approx(reports["off"]["sparsity"], abs=0)
    assert reports["on"]["modules"].keys() == reports["off"]["modules"].keys()


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_streamed_prune_equals_resident(arch, compute, tiny_models, calib_file, tmp_path):
    cfg = PruneConfig(layers=2, calib=CalibConfig(path=str(calib_file), samples=8, seqlen=64))
    reports = {}
    for mode in ("off", "on"):
        reports[mode] = run_stage("prune", str(tiny_models[arch]), cfg, out=tmp_path / mode,
                                  load=LoadConfig(stream=mode, compute=compute))
        assert reports[mode]["compute"] == compute
    on, off = reports["on"], reports["off"]
    assert on["dropped_layers"] == off["dropped_layers"]
    assert on["block_distances"] == off["block_distances"] and on["block_influence"] == off["block_influence"]
    assert on["streamed"] is True and not off.get("streamed")  # the comparison is of a streamed run with a resident one
    assert (on["params_before"], on["params_after"]) == (off["params_before"], off["params_after"])
    a, b = _weights(tmp_path / "on"), _weights(tmp_path / "off")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "on" / "config.json").read_text())["num_hidden_layers"] == 4


def test_prune_drop_runs_no_forward(tiny_models, tmp_path, monkeypatch):
    """Explicit indices: tensors are copied under their new numbers; no layer is ever loaded or run."""
    from draftkit.engine import layers as layerwise
    from draftkit.engine import placement as streamed

    def boom(*a, **k):
        raise AssertionError("a forward or a layer load happened")

    monkeypatch.setattr(layerwise.StreamedLayers, "load", boom)
    monkeypatch.setattr(streamed, "estimate_memory", boom)
    src = tiny_models["qwen2"]
    report = run_stage("prune", str(src), PruneConfig(drop="1,3"), out=tmp_path / "o")
    assert report["streamed"] and report["dropped_layers"] == [1, 3] and report["layers_after"] == 4
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "o" / "model.safetensors")
    for new, old in enumerate([0, 2, 4, 5]):
        for k, v in before.items():
            if k.startswith(f"model.layers.{old}."):
                assert torch.equal(after[k.replace(f"layers.{old}.", f"layers.{new}.")], v)
    assert not any(k.startswith(("model.layers.4.", "model.layers.5.")) for k in after)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.config.layer_types == [t for i, t in enumerate(json.loads((src / "config.json").read_text())["layer_types"]) if i not in (1, 3)]


def test_sharded_write_reloads_with_plain_transformers(tiny_models, calib_file, tmp_path, monkeypatch):
    from draftkit.engine import layers

    monkeypatch.setattr(layers, "SHARD_BYTES", 200_000)  # several shards for a ~1 MB model
    cfg = SparsifyConfig(sparsity=0.5, calib=CalibConfig(path=str(calib_file), samples=4, seqlen=32))
    run_stage("sparsify", str(tiny_models["llama"]), cfg, out=tmp_path / "o", load=LoadConfig(stream="on"))
    index = json.loads((tmp_path / "o" / SAFE_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    total = 0
    for f in files:
        with safe_open(tmp_path / "o" / f, "pt") as st:
            total += sum(st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in st.keys())
    assert total == index["metadata"]["total_size"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    q = model.model.layers[3].self_attn.q_proj.weight
    assert int((q == 0).sum()) == q.numel() // 2
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_shard_writer_dtypes_and_order(tmp_path):
    plan = [("a", (3, 4), torch.bfloat16), ("b", (5,), torch.int64), ("c", (2, 2), torch.float32)]
    w = ShardWriter(tmp_path, plan, max_shard_bytes=30)
    t = {"a": torch.randn(3, 4).bfloat16(), "b": torch.arange(5), "c": torch.randn(2, 2)}
    w.write({"b": t["b"], "a": t["a"]})  # any order inside one call
    with pytest.raises(RuntimeError, match="order expects c"):
        w.write({"a": t["a"]})
    w.write({"c": t["c"]})
    w.close()
    ck = LazyCheckpoint(tmp_path)
    got = ck.read(["a", "b", "c"])
    assert all(torch.equal(got[k], t[k]) for k in t)
    assert ck.nbytes() == 3 * 4 * 2 + 5 * 8 + 4 * 4


# ------------------------------------------------------------------------------------------ bad input


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _shard(src, dst):
    """The tiny model re-saved in 3 shards with an index."""
    model = AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(dst, max_shard_size="300KB")
    for f in src.glob("tokenizer*"):
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _run(model_dir, tmp_path, **load):
    cfg = SparsifyConfig(method="magnitude", sparsity=0.5)
    return run_stage("sparsify", str(model_dir), cfg, out=tmp_path / "out", load=LoadConfig(stream="on", **load))


def test_missing_shard_is_one_line(tiny_llama, tmp_path):
    d = _shard(tiny_llama, tmp_path / "m")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    with pytest.raises(ModelLoadError, match=rf"names {shards[1].name}.*the checkpoint is incomplete"):
        _run(d, tmp_path)
    assert not (tmp_path / "out").exists()


def test_index_naming_an_absent_file(tiny_llama, tmp_path):
    d = _shard(tiny_llama, tmp_path / "m")
    index = json.loads((d / SAFE_INDEX).read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "model-00009-of-00009.safetensors"
    (d / SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="names model-00009-of-00009.safetensors, which is not in"):
        _run(d, tmp_path)
    assert not (tmp_path / "out").exists()


def test_shards_without_index(tiny_llama, tmp_path):
    d = _shard(tiny_llama, tmp_path / "m")
    (d / SAFE_INDEX).unlink()
    with pytest.raises(ModelLoadError, match="but no model.safetensors.index.json"):
        _run(d, tmp_path)


def test_tensor_shape_disagreeing_with_config(tiny_llama, tmp_path):
    d = _copy_model(tiny_llama, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"model.safetensors: tensor model.layers.0.mlp.\w+_proj.weight has shape .* config.json implies"):
        _run(d, tmp_path)
    assert not (tmp_path / "out").exists()


def test_non_safetensors_checkpoint_too_large(tiny_llama, tmp_path, monkeypatch):
    from draftkit import memory

    d = tmp_path / "m"
    d.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_llama / "model.safetensors"), d / "pytorch_model.bin")
    assert not list(d.glob("*.safetensors"))
    with pytest.raises(InvalidInputError, match="--stream on needs a local safetensors checkpoint"):
        _run(d, tmp_path)
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 100 * 2**20)  # 100 MB free
    cfg = SparsifyConfig(sparsity=0.5, calib=CalibConfig(samples=4, seqlen=32))
    with pytest.raises(InvalidInputError, match="not safetensors, so it cannot be streamed"):
        run_stage("sparsify", str(d), cfg, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_memory_estimate_parts_and_advice(tiny_llama, monkeypatch):
    from transformers import AutoConfig

    from draftkit import memory

    config = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    size = 16_060_000_000
    cpu = torch.device("cpu")
    kw = dict(ckpt_bytes=size, device=cpu, tokens=8 * 128, seqlen=128, chunk_tokens=4 * 128, sparsegpt=False, dtype_bytes=2)
    resident = memory.estimate_memory(config, streamed=False, **kw)
    streamed = memory.estimate_memory(config, streamed=True, **kw)
    assert resident.parts["weights"] == size
    embed = 128256 * 4096 * 2
    layer = (size - 2 * embed) // 32
    waiting = 8 * 128 * 4096 * 2  # every token's hidden state between two layers
    assert streamed.parts["weights"] == layer
    assert streamed.parts["activations"] == waiting + 4 * 128 * 4096 * 2  # and the output of the chunk in the layer
    # the embeddings are read (with the hidden states they make) before the first layer and freed: the larger phase
    assert streamed.parts["embedding"] == embed + waiting > layer + streamed.parts["activations"]
    assert streamed.host == memory.PROCESS_BYTES + embed + waiting
    assert "embedding" not in resident.parts
    assert resident.host == memory.PROCESS_BYTES + sum(resident.parts.values())
    assert streamed.host < 3e9 < resident.host
    sg = memory.estimate_memory(config, streamed=True, **{**kw, "sparsegpt": True})
    assert sg.parts["hessian"] >= 2 * 14336**2 * 4
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 10**9)
    with pytest.raises(InvalidInputError, match="--device cuda, a smaller --chunk-tokens, or fewer --samples"):
        memory.check_fits(streamed, streamed=True, can_stream=True, device=cpu)
    with pytest.raises(InvalidInputError, match="pass --stream on"):
        memory.check_fits(resident, streamed=False, can_stream=True, device=cpu)
    more = memory.estimate_memory(config, streamed=True, **{**kw, "tokens": 16 * 128}).parts["activations"]
    assert more - streamed.parts["activations"] == waiting
    # float32 weights computed in bf16: the activations (and one layer's forward) are counted in 2 bytes
    f32 = memory.estimate_memory(config, streamed=True, **{**kw, "dtype_bytes": 4})
    bf16 = memory.estimate_memory(config, streamed=True, **{**kw, "dtype_bytes": 4, "act_bytes": 2})
    assert bf16.parts["weights"] == f32.parts["weights"] and 2 * bf16.parts["activations"] == f32.parts["activations"]
    assert 2 * bf16.parts["layer_forward"] == f32.parts["layer_forward"]


def test_streamed_output_with_nan_is_not_saved(tiny_llama, tmp_path):
    d = _copy_model(tiny_llama, tmp_path / "m")
    from safetensors.torch import save_file

    w = load_file(d / "model.safetensors")
    w["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match="NaN/Inf weights in model.layers.1.mlp.up_proj.weight"):
        run_stage("prune", str(d), PruneConfig(drop="0"), out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["m"]


def test_streamed_tied_embeddings(tiny_tokenizer_dir, calib_file, tmp_path):
    """A tied head (SmolLM2, Llama-3.2-1B) is stored once, under the embeddings' key, and stays tied."""
    from tests.conftest import make_tied_llama

    src = make_tied_llama(tiny_tokenizer_dir, tmp_path / "tied", layers=3)
    scfg = SparsifyConfig(sparsity=0.5, calib=CalibConfig(path=str(calib_file), samples=4, seqlen=32))
    for mode in ("off", "on"):
        run_stage("sparsify", str(src), scfg, out=tmp_path / mode, load=LoadConfig(stream=mode))
    _same(_weights(tmp_path / "on"), _weights(tmp_path / "off"))
    assert "lm_head.weight" not in load_file(tmp_path / "on" / "model.safetensors")


@pytest.mark.gpu
def test_streamed_sparsify_on_gpu_holds_one_layer(tiny_models, calib_file, tmp_path):
    """On a GPU only the current layer (and the embeddings while capturing) is on the device; the
    result matches the CPU run up to float summation order."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = SparsifyConfig(sparsity=0.5, calib=CalibConfig(path=str(calib_file), samples=6, seqlen=48))
    src = tiny_models["llama"]
    run_stage("sparsify", str(src), cfg, out=tmp_path / "cpu", load=LoadConfig(stream="on", device="cpu"))
    torch.cuda.reset_peak_memory_stats()
    report = run_stage("sparsify", str(src), cfg, out=tmp_path / "gpu", load=LoadConfig(stream="on", device="cuda"))
    assert report["streamed"]
    ckpt = LazyCheckpoint(src)
    layer0 = ckpt.nbytes(k for k in ckpt.keys() if k.startswith("model.layers.0."))
    embed = ckpt.nbytes(["model.embed_tokens.weight"])
    assert torch.cuda.max_memory_allocated() < embed + 3 * layer0 + 8 * 2**20
    a, b = _weights(tmp_path / "gpu"), _weights(tmp_path / "cpu")
    for k in a:
        agree = float(((a[k] == 0) == (b[k] == 0)).float().mean())
        assert agree > 0.98, k


@pytest.mark.parametrize("stage", ["prune", "sparsify"])
def test_streamed_output_of_a_sparse_export_is_plain_dense(stage, tiny_llama, calib_file, tmp_path):
    """A sparse-bitmask input is read decompressed and written dense: its config must not keep the input's
    quantization_config (sparsity_config), or plain transformers / vLLM cannot load the output."""
    from draftkit.export import ExportConfig
    from tests._helpers_export_eval import make_sparse_model

    src = make_sparse_model(tiny_llama, tmp_path / "src", 0.5)
    run_stage("export", str(src), ExportConfig(format="sparse"), out=tmp_path / "exp")
    assert "quantization_config" in json.loads((tmp_path / "exp" / "config.json").read_text())
    calib = CalibConfig(path=str(calib_file), samples=4, seqlen=32)
    cfg = PruneConfig(drop="2") if stage == "prune" else SparsifyConfig(method="wanda", sparsity=0.6, calib=calib)
    report = run_stage(stage, str(tmp_path / "exp"), cfg, out=tmp_path / "out", load=LoadConfig(stream="on"))
    assert report["streamed"] is True
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == (5 if stage == "prune" else 6)
