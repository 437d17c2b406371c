"""The layer-wise sparsify driver on tiny models: equality with a full forward at sparsity 0, exact
sparsity and N:M on every targeted module, dense embeddings/lm_head, chunked == single-pass shapes."""

import pytest
import torch
from torch import nn

from draftkit.checkpoint import load_model_and_tokenizer
from draftkit.compute import ComputeChoice, cast_for_compute, computing
from draftkit.data import CalibConfig
from draftkit.modeling import decoder_layers
from draftkit.sparsify import SparsifyConfig, sparsify_model
from draftkit.sparsify.masks import is_nm_sparse, target_linears
from draftkit.sparsify.runner import calibration_chunks


def _cfg(calib_file, **kw):
    return SparsifyConfig(calib=CalibConfig(path=str(calib_file), samples=6, seqlen=48), **kw)


@pytest.mark.parametrize("compute", [None, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("chunk_tokens", [None, 96])
def test_sparsity_zero_driver_output_equals_full_forward(arch, chunk_tokens, compute, tiny_models, calib_file):
    """gemma2 alternates sliding-window and full attention: each layer must get its own mask. With a bf16
    compute dtype the driver equals the forward of the model cast to bf16, and the float32 weights come back
    bit for bit."""
    model, tok = load_model_and_tokenizer(str(tiny_models[arch]))
    cfg = _cfg(calib_file, sparsity=0.0, chunk_tokens=chunk_tokens)
    chunks, info = calibration_chunks(model, tok, cfg)
    assert info["chunks"] == (1 if chunk_tokens is None else 3)
    last = decoder_layers(model)[-1]
    seen = []
    handle = last.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad(), cast_for_compute(model, compute):
        for ids in chunks:
            model.model(input_ids=ids, use_cache=False)
    expected = torch.cat(seen)
    seen.clear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with computing(None if compute is None else ComputeChoice(compute, "asked")):
        model, report = sparsify_model(model, tok, cfg)
    handle.remove()
    got = torch.cat(seen[-len(chunks):]) if chunk_tokens else seen[-1]
    assert got.dtype == expected.dtype == (compute or torch.float32)
    tol = 1e-5 if compute is None else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert report["sparsity"] == 0.0


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_exact_sparsity_and_nm_on_every_module(method, pattern, tiny_llama, calib_file):
    model, tok = load_model_and_tokenizer(str(tiny_llama))
    dense = {n: p.clone() for n, p in model.named_parameters() if "layers" not in n}
    kw = {"sparsity": 0.5} if pattern == "unstructured" else {}
    model, report = sparsify_model(model, tok, _cfg(calib_file, method=method, pattern=pattern, **kw))
    targets = target_linears(model)
    assert set(report["modules"]) == set(targets) and len(targets) == 6 * 7
    for name, lin in targets.items():
        zeros = int((lin.weight == 0).sum())
        assert zeros == lin.weight.numel() // 2, name
        if pattern == "2:4":
            assert is_nm_sparse(lin.weight, 2, 4), name
        if method != "magnitude":
            assert 0 < report["modules"][name]["rel_error"] < 1
    for n, p in model.named_parameters():  # embeddings, final norm and lm_head untouched
        if n in dense:
            assert torch.equal(p, dense[n]), n
    assert report["sparsity"] == pytest.approx(0.5)


def test_targets_and_ignore_and_chunked(tiny_models, calib_file):
    model, tok = load_model_and_tokenizer(str(tiny_models["phi3"]))  # fused qkv_proj and gate_up_proj
    cfg = _cfg(calib_file, sparsity=0.6, ignore=r"down_proj", targets=r"layers\.[0-3]\.", chunk_tokens=100)
    model, report = sparsify_model(model, tok, cfg)
    assert report["calibration"]["chunks"] == 3
    assert len(report["modules"]) == 4 * 3
    for name, lin in model.named_modules():
        if isinstance(lin, nn.Linear) and "layers" in name:
            frac = float((lin.weight == 0).float().mean())
            if name in report["modules"]:
                assert frac == pytest.approx(int(0.6 * lin.weight.numel() + 1e-6) / lin.weight.numel())
            else:
                assert frac == 0.0, name


def test_sparsegpt_beats_magnitude_on_layer_error(tiny_llama, calib_file):
    errs = {}
    for method in ("sparsegpt", "wanda"):
        model, tok = load_model_and_tokenizer(str(tiny_llama))
        _, report = sparsify_model(model, tok, _cfg(calib_file, method=method, sparsity=0.5))
        errs[method] = report["mean_rel_error"]
    assert errs["sparsegpt"] < errs["wanda"]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("chunk_tokens", [None, 96])
def test_linear_never_called_is_pruned_by_magnitude(method, chunk_tokens, tiny_llama, calib_file):
    """A linear the calibration forward never calls (an unused expert) has no Hessian: it is pruned by magnitude,
    and the report says so (it used to end in an internal AttributeError)."""
    from draftkit.sparsify.baselines import magnitude_mask

    model, tok = load_model_and_tokenizer(str(tiny_llama))
    mlp = decoder_layers(model)[1].mlp
    mlp.forward = lambda x: nn.functional.linear(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), mlp.down_proj.weight)
    W = mlp.down_proj.weight.detach().clone()
    model, report = sparsify_model(model, tok, _cfg(calib_file, method=method, sparsity=0.5, chunk_tokens=chunk_tokens))
    entry = report["modules"]["model.layers.1.mlp.down_proj"]
    assert entry["pruned_by"].startswith("magnitude") and entry["sparsity"] == pytest.approx(0.5)
    assert torch.equal(mlp.down_proj.weight != 0, ~magnitude_mask(W, sparsity=0.5))
    assert "pruned_by" not in report["modules"]["model.layers.1.mlp.up_proj"]


def test_hessian_that_cannot_be_factored_is_bad_input(tiny_llama, calib_file, monkeypatch):
    """SparseGPT's Cholesky failing even after the retries reaches the user as one line (exit 2), not an
    internal error: the fix (more samples, a larger --dampening) is theirs to make."""
    from draftkit.errors import InvalidInputError
    from draftkit.sparsify import pruner

    real = pruner.inverse_hessian_cholesky
    # a negative definite Hessian: no dampening makes it positive definite
    monkeypatch.setattr(pruner, "inverse_hessian_cholesky", lambda H, d: real(-H - torch.eye(len(H)), d, max_retries=1))
    model, tok = load_model_and_tokenizer(str(tiny_llama))
    with pytest.raises(InvalidInputError, match=r"self_attn\.q_proj: .*--dampening"):
        sparsify_model(model, tok, _cfg(calib_file, method="sparsegpt", sparsity=0.5))
