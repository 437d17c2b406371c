"""The other stages on MoE models: distill holds the zeros of fused expert parameters, inspect counts experts per
layer and active parameters per token, MACs per token count top_k experts, export and reload work."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import draftkit
from draftkit.cli import app
from draftkit.distill import DistillConfig, load_examples, train_model
from draftkit.evaluate.cost import macs_per_token
from draftkit.model_info import inspect_model
from draftkit.modeling import count_parameters
from draftkit.moe import moe_blocks
from draftkit.sparsify.masks import extract_masks, layer_sparsity, model_sparsity
from tests._helpers_distill import one_thread, sft_file

FIXTURES = (one_thread, sft_file)
runner = CliRunner()


def _half_zero(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (b,) in moe_blocks(model).values():
            for w in (b.experts.gate_up_proj, b.experts.down_proj):
                w.mul_(torch.rand(w.shape, generator=g) >= 0.5)


@pytest.mark.usefixtures("one_thread")
def test_distill_holds_the_zeros_of_fused_experts(tiny_moe_models, sft_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_models["qwen3_moe"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_moe_models["qwen3_moe"])
    _half_zero(model)
    masks = extract_masks(model, min_sparsity=0.01)
    experts = [n for n in masks if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj")]
    assert len(experts) == 2 * 4
    before = {n: model.get_parameter(n).detach().clone() for n in experts}
    cfg = DistillConfig(dataset=str(sft_file), regenerate=False, lr=3e-3, train_batch_size=4, eval_fraction=0.2,
                        warmup=0.0, lr_schedule="constant", checkpoints=False, epochs=2)
    model, report = train_model(model, tok, load_examples(cfg), cfg)
    assert report["zero_positions_changed"] == 0 and report["masked_modules"] == len(masks)
    for n in experts:
        w = model.get_parameter(n)
        assert torch.equal(w != 0, masks[n]), n  # the same zeros in every expert
        assert not torch.equal(w, before[n]), n  # and the experts trained


def test_inspect_counts_experts_and_active_parameters(tiny_moe_models, tmp_path):
    for arch, shared in (("qwen2_moe", True), ("mixtral", False)):
        report = inspect_model(str(tiny_moe_models[arch]))
        model = AutoModelForCausalLM.from_pretrained(tiny_moe_models[arch])
        e = report["experts"]
        assert e["experts_per_layer"] == [8, 8, 8, 8] and e["top_k"] == 2 and e["shared_experts"] is shared
        per_expert = sum(getattr(b.experts, p)[0].numel() for (b,) in moe_blocks(model).values()
                         for p in ("gate_up_proj", "down_proj")) // 4
        assert e["routed_expert_parameters"] == 4 * 8 * per_expert
        assert e["active_parameters_per_token"] == count_parameters(model) - 4 * 6 * per_expert
    res = runner.invoke(app, ["inspect", str(tiny_moe_models["qwen3_moe"])])
    assert res.exit_code == 0 and "experts per layer" in res.output and "active parameters" in res.output
    assert inspect_model(str(tiny_moe_models["qwen3_moe"]))["linear_sparsity"] == 0.0


def test_macs_count_top_k_experts_and_the_router(tiny_moe_models, calib_file, tmp_path):
    src = tiny_moe_models["qwen3_moe"]
    model = AutoModelForCausalLM.from_pretrained(src)
    cfg = model.config
    attn = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    router = cfg.num_experts * cfg.hidden_size
    context = 16
    heads_term = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * context
    want = attn + cfg.num_hidden_layers * (router + cfg.num_experts_per_tok * per_expert) + heads_term
    assert macs_per_token(model, context) == want
    out = tmp_path / "p"
    res = runner.invoke(app, ["prune", str(src), "--experts", "4", "--calib", str(calib_file), "--samples", "4",
                              "--seqlen", "32", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    pruned = AutoModelForCausalLM.from_pretrained(out)
    # removing experts saves memory, not per-token compute: only the router's rows go
    assert macs_per_token(pruned, context) == want - cfg.num_hidden_layers * 4 * cfg.hidden_size
    _half_zero(pruned)
    assert macs_per_token(pruned, context, nonzero=True) < macs_per_token(pruned, context)


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_sparse_moe_exports_and_reloads(fmt, tiny_moe_models, calib_file, tmp_path):
    sp = tmp_path / "sp"
    res = runner.invoke(app, ["sparsify", str(tiny_moe_models["mixtral"]), "--method", "magnitude", "-o", str(sp)])
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(sp)
    assert model_sparsity(model)["overall"] == pytest.approx(0.5)  # expert weights counted
    assert all(s == pytest.approx(0.5, abs=0.01) for s in layer_sparsity(model))
    out = tmp_path / "ex"
    res = runner.invoke(app, ["export", str(sp), "--format", fmt, "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    again = AutoModelForCausalLM.from_pretrained(out) if fmt == "dense" else draftkit.load_model(str(out))
    if fmt == "sparse":
        assert report["compressed_modules"] > 0
    for (a,), (b,) in zip(moe_blocks(model).values(), moe_blocks(again).values(), strict=True):
        assert torch.equal(a.experts.gate_up_proj, b.experts.gate_up_proj)
        assert torch.equal(a.router.weight, b.router.weight)


def test_memory_estimate_counts_the_routed_experts():
    import copy

    from draftkit.memory import estimate_memory
    from tests.conftest import tiny_moe_config

    moe = tiny_moe_config("qwen3_moe", 400)
    dense = copy.deepcopy(moe)
    dense.num_experts = 0
    kw = dict(ckpt_bytes=10**6, streamed=False, device=torch.device("cpu"), tokens=512, seqlen=64, chunk_tokens=512,
              sparsegpt=True)
    extra = estimate_memory(moe, **kw).parts["layer_forward"] - estimate_memory(dense, **kw).parts["layer_forward"]
    assert extra == 512 * 4 * (8 + 2 * (2 * 64 + 3 * 32))  # router scores + top-2 experts' values per token
