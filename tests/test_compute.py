"""The compute dtype apart from the storage dtype: ``auto`` against faked CPU flags and devices, weights cast
for a forward and put back bit for bit, and a bf16-compute sparsify of a float32 checkpoint saving float32
weights whose masks are those of a float32 run (exactly for magnitude; within a measured bound otherwise)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from draftkit import compute
from draftkit.compute import Masters, cast_for_compute, computing, cpu_flags, resolve_compute, to_compute
from draftkit.data import CalibConfig
from draftkit.engine.forward import run_layer as _RUN_LAYER
from draftkit.sparsify import SparsifyConfig
from draftkit.stages import LoadConfig, run_stage

# ------------------------------------------------------------------------------------------------ auto


@pytest.mark.parametrize(("flags", "dtype", "why"), [
    ({"fpu", "avx2", "avx512f", "amx_tile", "amx_bf16"}, torch.bfloat16, "AMX_BF16"),
    ({"fpu", "avx2", "avx512f", "avx512_bf16"}, torch.bfloat16, "AVX512_BF16"),
    ({"fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16"}, torch.bfloat16, "AVX512_BF16"),
    ({"fpu", "avx2", "avx512f", "avx512_vnni"}, torch.float32, "no fast bf16 on cpu"),
    (set(), torch.float32, "no fast bf16 on cpu"),
])
def test_auto_on_cpu_reads_the_flags(flags, dtype, why):
    choice = resolve_compute("auto", "cpu", flags=flags)
    assert choice.dtype == dtype and why in choice.why and choice.why.startswith("auto: ")


@pytest.mark.parametrize("setting", ["float32", "bfloat16", "float16"])
def test_an_explicit_setting_is_kept_whatever_the_device(setting):
    for flags in (set(), {"amx_bf16"}):
        choice = resolve_compute(setting, "cpu", flags=flags)
        assert choice.name == setting and choice.why == "asked"


def test_cpu_flags_from_cpuinfo(tmp_path):
    (tmp_path / "x86").write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\n"
                                  "processor\t: 1\nflags\t\t: fpu\n")
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_flags(str(tmp_path / "x86")) == {"fpu", "avx512f", "amx_bf16", "amx_tile"}
    assert "bf16" in cpu_flags(str(tmp_path / "arm"))  # ARM's bf16 is no AMX/AVX512-BF16: auto stays float32
    assert resolve_compute("auto", "cpu", flags=cpu_flags(str(tmp_path / "arm"))).dtype == torch.float32
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_auto_reads_this_machines_flags_by_default(monkeypatch):
    monkeypatch.setattr(compute, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx512_bf16"}))
    assert resolve_compute("auto", "cpu").dtype == torch.bfloat16
    monkeypatch.setattr(compute, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx2"}))
    assert resolve_compute("auto", "cpu").dtype == torch.float32


@pytest.mark.parametrize(("bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_faked_cuda(bf16, dtype, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    choice = resolve_compute("auto", "cuda:0", flags={"amx_bf16"})  # the CPU's flags do not matter for a GPU
    assert choice.dtype == dtype
    assert ("CUDA device with bf16 support" in choice.why) is bf16


@pytest.mark.parametrize(("ok", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_faked_mps(ok, dtype, monkeypatch):
    monkeypatch.setattr(compute, "_mps_bf16", lambda: ok)
    assert resolve_compute("auto", "mps", flags=set()).dtype == dtype


def test_spec_keeps_float32_under_auto():
    """Measured: bf16 broke greedy spec's losslessness on SmolLM2-135M (benchmarks/results/compute_dtype.json)."""
    choice = resolve_compute("auto", "cpu", flags={"amx_bf16"}, stage="spec")
    assert choice.dtype == torch.float32 and "lossless" in choice.why
    assert resolve_compute("auto", "cpu", flags={"amx_bf16"}, stage="eval").dtype == torch.bfloat16


def test_a_stage_listed_float32_keeps_it_under_auto_only(monkeypatch):
    from draftkit import registry

    monkeypatch.setitem(registry.stage("spec")._fields, "auto_float32", "bf16 changed its result")
    assert resolve_compute("auto", "cpu", flags={"amx_bf16"}, stage="spec").dtype == torch.float32
    assert resolve_compute("auto", "cpu", flags={"amx_bf16"}, stage="sparsify").dtype == torch.bfloat16
    assert resolve_compute("bfloat16", "cpu", flags=set(), stage="spec").dtype == torch.bfloat16


def test_the_choice_is_printed_with_why_on_the_estimate_line(tiny_llama, calib_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compute, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx512_bf16"}))
    cfg = SparsifyConfig(method="wanda", sparsity=0.5, calib=CalibConfig(path=str(calib_file), samples=4, seqlen=32))
    run_stage("sparsify", str(tiny_llama), cfg, out=tmp_path / "o", load=LoadConfig(stream="off"))
    lines = [x for x in capsys.readouterr().err.splitlines() if "compute" in x]
    assert len(lines) == 1 and lines[0].startswith("memory estimate:")
    assert lines[0].endswith("; resident; sparsify: compute bfloat16 (auto: CPU has AVX512_BF16)")
    # no forward (magnitude): nothing is printed, as for the memory estimate
    run_stage("sparsify", str(tiny_llama), cfg.model_copy(update={"method": "magnitude"}), out=tmp_path / "m",
              load=LoadConfig(compute="float16"))
    assert "compute" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ casting


def test_cast_for_compute_restores_every_weight_bit_for_bit(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    before = {n: (p, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with cast_for_compute(model, torch.bfloat16) as masters:
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        logits = model(ids).logits
        assert logits.dtype == torch.bfloat16
        first = model.model.layers[0].mlp.up_proj.weight
        assert masters.master(first).dtype == torch.float32
    for n, p in model.named_parameters():
        obj, ptr, value = before[n]
        assert p is obj and p.data_ptr() == ptr and p.dtype == torch.float32 and torch.equal(p, value), n
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers are left alone


def test_masters_of_nothing_cast_is_the_parameter():
    lin = torch.nn.Linear(4, 3)
    masters = Masters(None)
    masters.cast(lin)
    assert lin.weight.dtype == torch.float32 and masters.master(lin.weight) is lin.weight


def test_to_compute_keeps_an_additive_mask_finite():
    mask = torch.tensor([[0.0, torch.finfo(torch.float32).min]])
    cos = torch.tensor([0.5, 1.0])
    out = to_compute((mask, {"pe": (cos, cos)}, torch.tensor([1, 2]), None), torch.bfloat16)
    assert out[0].dtype == torch.bfloat16 and bool(torch.isfinite(out[0]).all())  # -inf would give NaN rows
    assert out[1]["pe"][0].dtype == torch.bfloat16 and out[2].dtype == torch.int64 and out[3] is None


def test_outside_a_stage_the_model_dtype_is_kept():
    assert compute.current_dtype() is None and compute.load_dtype() == "auto"
    with computing(resolve_compute("bfloat16", "cpu")):
        assert compute.current_dtype() == torch.bfloat16 and compute.load_dtype() == "bfloat16"
    assert compute.current_dtype() is None


# ------------------------------------------------------------------------------------------------ sparsify


def _sparsify(model, calib_file, out, method: str, compute_dtype: str, monkeypatch, stream: str = "off"):
    """run_stage's sparsify, recording the dtype of every decoder-layer forward's weights and input (the engine's
    layer forward, which sparsify's per-layer function runs its chunks through)."""
    import draftkit.engine.forward as forward

    seen: set[tuple[torch.dtype, torch.dtype]] = set()
    original = _RUN_LAYER

    def recording(layer, hidden, args):
        seen.add((next(layer.parameters()).dtype, hidden.dtype))
        return original(layer, hidden, args)

    monkeypatch.setattr(forward, "run_layer", recording)
    cfg = SparsifyConfig(method=method, sparsity=0.5, calib=CalibConfig(path=str(calib_file), samples=8, seqlen=64))
    report = run_stage("sparsify", str(model), cfg, out=out, load=LoadConfig(compute=compute_dtype, stream=stream))
    return report, load_file(out / "model.safetensors"), seen


@pytest.mark.parametrize(("method", "bound"), [("magnitude", 0.0), ("wanda", 0.02), ("sparsegpt", 0.01)])
def test_bf16_compute_saves_float32_with_float32_masks(method, bound, tiny_llama, calib_file, tmp_path, monkeypatch):
    """bf16 rounds the activations (8 significant bits), so the Hessians (SparseGPT) and input norms (Wanda)
    move by about 0.4% and weights whose scores sit that close to the threshold swap sides: measured on
    this model 0.2% (SparseGPT) and 0.7% (Wanda) of the mask entries differ, the reconstruction error the
    same to 1%. Magnitude reads no activation: its masks are identical."""
    src = load_file(tiny_llama / "model.safetensors")
    r32, w32, seen32 = _sparsify(tiny_llama, calib_file, tmp_path / "f32", method, "float32", monkeypatch)
    r16, w16, seen16 = _sparsify(tiny_llama, calib_file, tmp_path / "bf16", method, "bfloat16", monkeypatch)
    assert r16["compute"] == "bfloat16" and r32["compute"] == "float32"
    if method != "magnitude":  # the calibration forwards really ran in each compute dtype
        assert seen16 == {(torch.bfloat16, torch.bfloat16)} and seen32 == {(torch.float32, torch.float32)}
    assert {v.dtype for v in w16.values()} == {torch.float32}  # the storage dtype of the input
    differ = total = 0
    for k, v in w16.items():
        if k in r16["modules"] or k.removesuffix(".weight") in r16["modules"]:
            assert float((v == 0).float().mean()) == pytest.approx(0.5, abs=0.01), k
            differ += int(((v == 0) != (w32[k] == 0)).sum())
            total += v.numel()
        else:  # embeddings, norms, head: what no stage edits is the input bit for bit
            assert torch.equal(v, src[k]), k
    assert total > 0 and differ / total <= bound
    if method == "magnitude":
        assert all(torch.equal(w16[k], w32[k]) for k in w16)
    else:
        assert r16["mean_rel_error"] == pytest.approx(r32["mean_rel_error"], rel=0.02)


def test_streamed_bf16_compute_equals_resident(tiny_llama, calib_file, tmp_path, monkeypatch):
    r_off, w_off, _ = _sparsify(tiny_llama, calib_file, tmp_path / "off", "sparsegpt", "bfloat16", monkeypatch)
    r_on, w_on, seen = _sparsify(tiny_llama, calib_file, tmp_path / "on", "sparsegpt", "bfloat16", monkeypatch, "on")
    assert r_on["streamed"] and not r_off["streamed"] and seen == {(torch.bfloat16, torch.bfloat16)}
    assert w_on.keys() == w_off.keys() and all(torch.equal(w_on[k], w_off[k]) for k in w_on)
    assert {v.dtype for v in w_on.values()} == {torch.float32}
