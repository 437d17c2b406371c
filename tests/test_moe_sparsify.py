"""Sparsify reaches the routed experts of MoE models (fused 3-D parameters): every expert is pruned to the
asked sparsity from the tokens routed to it, the router stays dense, an expert no token reaches falls back to
magnitude and the report says which; the reported sparsity counts the expert weights."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from draftkit.checkpoint import load_model_and_tokenizer
from draftkit.cli import app
from draftkit.data import CalibConfig
from draftkit.modeling import count_parameters, decoder_layers
from draftkit.moe import moe_blocks
from draftkit.sparsify import SparsifyConfig
from draftkit.sparsify.baselines import magnitude_mask, wanda_mask
from draftkit.sparsify.runner import calibration_chunks, sparsify_with_tokens

runner = CliRunner()


def _cfg(calib_file, **kw):
    return SparsifyConfig(calib=CalibConfig(path=str(calib_file), samples=6, seqlen=48), **kw)


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_cli_sparsifies_every_expert_and_never_the_router(arch, method, compute, tiny_moe_models, calib_file, tmp_path):
    src = tiny_moe_models[arch]
    out = tmp_path / "sp"
    res = runner.invoke(app, ["sparsify", str(src), "--method", method, "--sparsity", "0.5", "--calib", str(calib_file),
                              "--samples", "6", "--seqlen", "48", "-o", str(out), "--json", "--compute-dtype", compute])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    before = AutoModelForCausalLM.from_pretrained(src)
    after = AutoModelForCausalLM.from_pretrained(out)
    n_layers = len(decoder_layers(after))
    blocks = moe_blocks(after)
    assert sorted(blocks) == list(range(n_layers))
    expected_targets = 0
    for i, (block,) in blocks.items():
        ex = block.experts
        for j in range(block.num_experts):
            for W in (ex.gate_up_proj[j], ex.down_proj[j]):
                assert _zeros(W) == W.numel() // 2, (i, j)  # every expert, each projection exactly 50%
                expected_targets += W.numel()
        router_before = moe_blocks(before)[i][0].router.weight
        assert torch.equal(block.router.weight, router_before) and _zeros(block.router.weight) == 0
        attn = decoder_layers(after)[i].self_attn
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            assert _zeros(lin.weight) == lin.weight.numel() // 2
            expected_targets += lin.weight.numel()
    assert report["targeted_weights"] == expected_targets
    assert report["targeted_share"] == pytest.approx(expected_targets / count_parameters(after), abs=1e-6)
    assert report["sparsity"] == pytest.approx(0.5)
    assert report["experts"]["sparsity"] == pytest.approx(0.5)
    assert report["experts"]["share_of_targeted"] > 0.5  # the experts are most of the targeted weights
    assert len([n for n in report["modules"] if ".experts." in n]) == n_layers * 8 * 2


def _route_to_first_four(block) -> None:
    """Router rows 0-3 as two opposite pairs, rows 4-7 zero: for any input one row of each pair has a
    positive logit, so the top-2 are always among experts 0-3 and experts 4-7 never receive a token."""
    with torch.no_grad():
        w = block.router.weight
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(w.shape[1], generator=g), torch.randn(w.shape[1], generator=g)
        w.zero_()
        w[0], w[1], w[2], w[3] = a, -a, b, -b


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_wanda_norms_come_from_the_tokens_routed_to_each_expert(arch, tiny_moe_models, calib_file):
    """Only the experts are targeted, so layer 0's experts see exactly the dense model's routed tokens:
    each expert's Wanda mask must be the one built from the inputs of the tokens routed to it."""
    model, tok = load_model_and_tokenizer(str(tiny_moe_models[arch]))
    _route_to_first_four(moe_blocks(model)[0][0])
    cfg = _cfg(calib_file, method="wanda", sparsity=0.5, targets=r"experts")
    chunks, _ = calibration_chunks(model, tok, cfg)
    block = moe_blocks(model)[0][0]
    seen = {}
    handle = block.experts.register_forward_pre_hook(lambda m, a: seen.setdefault("args", a))
    with torch.no_grad():
        model(input_ids=chunks[0], use_cache=False)
    handle.remove()
    hidden, top_k_index, _ = seen["args"]
    W_gu = block.experts.gate_up_proj.detach().clone()
    W_d = block.experts.down_proj.detach().clone()
    model, report = sparsify_with_tokens(model, cfg, chunks)
    ex = block.experts
    differs = 0
    for j in range(block.num_experts):
        routed = (top_k_index == j).any(dim=-1)
        name = f"model.layers.0.{block.name}.experts.{j}"
        if j >= 4:  # no token: magnitude, and the report says so
            assert not routed.any()
            assert torch.equal(ex.gate_up_proj[j] == 0, magnitude_mask(W_gu[j], sparsity=0.5))
            assert torch.equal(ex.down_proj[j] == 0, magnitude_mask(W_d[j], sparsity=0.5))
            assert name in report["experts"]["without_tokens"]
            assert report["modules"][f"{name}.gate_up_proj"]["pruned_by"].startswith("magnitude")
            continue
        x = hidden[routed]
        assert len(x) > 0 and name not in report["experts"]["without_tokens"]
        want = wanda_mask(W_gu[j], (x.float() ** 2).sum(0), sparsity=0.5)
        assert torch.equal(ex.gate_up_proj[j] == 0, want), j
        everyone = wanda_mask(W_gu[j], (hidden.float() ** 2).sum(0), sparsity=0.5)
        differs += int(not torch.equal(want, everyone))
        gate, up = torch.nn.functional.linear(x, ex.gate_up_proj[j]).chunk(2, dim=-1)
        h = ex.act_fn(gate) * up  # the down projection reads what the pruned gate/up produce
        assert torch.equal(ex.down_proj[j] == 0, wanda_mask(W_d[j], (h.float() ** 2).sum(0), sparsity=0.5)), j
    assert differs > 0  # the routed tokens' norms are not all tokens' norms
    for i, (b,) in moe_blocks(model).items():
        assert _zeros(b.router.weight) == (b.router.weight.numel() - 4 * b.router.weight.shape[1] if i == 0 else 0)
        attn = decoder_layers(model)[i].self_attn
        assert _zeros(attn.q_proj.weight) == 0  # not targeted


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_sparsegpt_chunked_matches_single_pass_on_experts(arch, tiny_moe_models, calib_file):
    """Several chunks: an expert's Hessian is summed over every chunk that routes tokens to it (its group may
    first appear in a later chunk), giving the single-pass masks."""
    masks = []
    for chunk_tokens in (None, 96):
        model, tok = load_model_and_tokenizer(str(tiny_moe_models[arch]))
        model, report = sparsify_with_tokens(model, _cfg(calib_file, chunk_tokens=chunk_tokens), None, tokenizer=tok)
        assert report["sparsity"] == pytest.approx(0.5)
        assert report["experts"]["without_tokens"] == []
        masks.append({i: b.experts.gate_up_proj == 0 for i, (b,) in moe_blocks(model).items()})
    for i in masks[0]:
        agree = (masks[0][i] == masks[1][i]).float().mean().item()
        assert agree > 0.99, (i, agree)


@pytest.mark.parametrize("stream", ["off", "on"])
def test_shared_expert_pruned_and_its_gate_dense(stream, tiny_moe_models, calib_file, tmp_path):
    """Qwen2-MoE's shared expert is an ordinary MLP (pruned), its gate routes (dense), resident or streamed; the
    output stores the experts one by one, as transformers does."""
    from safetensors.torch import load_file

    from draftkit.stages import LoadConfig, run_stage

    cfg = SparsifyConfig(sparsity=0.5, calib=CalibConfig(path=str(calib_file), samples=6, seqlen=48))
    report = run_stage("sparsify", str(tiny_moe_models["qwen2_moe"]), cfg, out=tmp_path / stream,
                       load=LoadConfig(stream=stream))
    assert report["streamed"] is (stream == "on") and report["experts"]["sparsity"] == pytest.approx(0.5)
    w = load_file(tmp_path / stream / "model.safetensors")
    assert _zeros(w["model.layers.0.mlp.shared_expert.up_proj.weight"]) == w["model.layers.0.mlp.shared_expert.up_proj.weight"].numel() // 2
    assert _zeros(w["model.layers.0.mlp.shared_expert_gate.weight"]) == 0
    assert _zeros(w["model.layers.0.mlp.experts.3.up_proj.weight"]) > 0  # saved per expert, as transformers does


def test_sparsegpt_expert_weights_are_sparsegpt_on_their_routed_tokens(tiny_moe_models, calib_file):
    """Layer 0's experts (only the experts targeted): each gate/up projection is exactly SparseGPT on the
    Hessian of the tokens routed to that expert; the down projection's on what the pruned gate/up produce."""
    from draftkit.sparsify.sparsegpt import (
        accumulate_hessian,
        inverse_hessian_cholesky,
        make_empty_hessian,
        sparsegpt_prune,
    )

    model, tok = load_model_and_tokenizer(str(tiny_moe_models["mixtral"]))
    cfg = _cfg(calib_file, sparsity=0.5, targets=r"experts")
    chunks, _ = calibration_chunks(model, tok, cfg)
    (block,) = moe_blocks(model)[0]
    seen = {}
    handle = block.experts.register_forward_pre_hook(lambda m, a: seen.setdefault("args", a))
    with torch.no_grad():
        model(input_ids=chunks[0], use_cache=False)
    handle.remove()
    hidden, top_k_index, _ = seen["args"]
    W_gu, W_d = block.experts.gate_up_proj.detach().clone(), block.experts.down_proj.detach().clone()
    model, report = sparsify_with_tokens(model, cfg, chunks)
    ex = block.experts

    def sgpt(W, X):
        H, _ = accumulate_hessian(make_empty_hessian(X.shape[-1]), X, 0)
        return sparsegpt_prune(W, inverse_hessian_cholesky(H, cfg.dampening), sparsity=0.5,
                               block_size=cfg.block_size)[0]

    with torch.no_grad():
        for j in range(block.num_experts):
            x = hidden[(top_k_index == j).any(dim=-1)]
            assert len(x) > 0
            want = sgpt(W_gu[j], x)
            assert torch.equal(ex.gate_up_proj[j] == 0, want == 0), j  # the same mask
            torch.testing.assert_close(ex.gate_up_proj[j], want, rtol=0, atol=1e-5)  # and the same OBS update
            gate, up = torch.nn.functional.linear(x, ex.gate_up_proj[j]).chunk(2, dim=-1)
            want = sgpt(W_d[j], ex.act_fn(gate) * up)
            assert torch.equal(ex.down_proj[j] == 0, want == 0), j
            torch.testing.assert_close(ex.down_proj[j], want, rtol=0, atol=1e-5)
