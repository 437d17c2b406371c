"""Expert pruning (``prune --experts``) on tiny random Qwen3-MoE, Qwen2-MoE (shared expert), Mixtral and OLMoE:
exact expert counts, router shape and config, kept experts' weights and router logits unchanged, block outputs
unchanged for tokens routed only to kept experts, REAP/frequency/EAN saliency from the routed tokens, plain
``from_pretrained`` reload, KV cache after block drops, and one-line errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.data import CalibConfig
from draftkit.modeling import decoder_layers
from draftkit.moe import SaliencyStats, experts_to_keep, moe_blocks, saliency
from draftkit.prune import PruneConfig
from draftkit.stages import run_stage
from tests.conftest import MOE_ARCHS
from tests.test_prune_models import greedy_no_cache

runner = CliRunner()
CALIB = dict(samples=8, seqlen=48)


def test_saliency_formulas_and_ties():
    st = SaliencyStats(4)
    f = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1
    st.update(0, torch.tensor([0.5, 1.0]), f)
    st.update(2, torch.tensor([0.25]), torch.tensor([[6.0, 8.0]]))  # norm 10
    assert saliency(st, "reap").tolist() == [(0.5 * 5 + 1.0 * 1) / 2, 0.0, 0.25 * 10, 0.0]
    assert saliency(st, "frequency").tolist() == [2, 0, 1, 0]
    assert saliency(st, "ean").tolist() == [6.0, 0.0, 10.0, 0.0]
    S = torch.tensor([0.3, 0.1, 0.4, 0.2, 0.9, 0.05, 0.6, 0.7], dtype=torch.float64)
    assert experts_to_keep(S, 4) == [2, 4, 6, 7]
    assert experts_to_keep(S, 4, n_group=2) == [0, 2, 4, 7]  # two from each group of four: groups stay equal


def _block_output(block, hidden):
    with torch.no_grad():
        return block.module(hidden)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_prune_experts_reap_invariants_and_reload(arch, tiny_moe_models, calib_file, tmp_path):
    src = tiny_moe_models[arch]
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", str(src), "--experts", "0.5", "--calib", str(calib_file), "--samples", "8",
                              "--seqlen", "48", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    ex = report["experts"]
    assert ex["method"] == "reap" and ex["experts_before"] == 8 and ex["experts_after"] == 4
    assert len(ex["layers"]) == 4 and report["dropped_layers"] == []
    before = AutoModelForCausalLM.from_pretrained(src).eval()
    after = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers reload
    key = "num_local_experts" if arch == "mixtral" else "num_experts"
    assert getattr(after.config, key) == 4 and after.config.num_experts_per_tok == 2
    old_blocks, new_blocks = moe_blocks(before), moe_blocks(after)
    g = torch.Generator().manual_seed(0)
    for i, (new,) in new_blocks.items():
        (old,) = old_blocks[i]
        entry = ex["layers"][f"model.layers.{i}.{new.name}"]
        keep = entry["kept"]
        assert len(keep) == 4 and keep == sorted(keep) and len(entry["saliency"]) == 8
        assert sorted(entry["saliency"])[:4] == sorted(s for j, s in enumerate(entry["saliency"]) if j not in keep)
        assert new.num_experts == 4 and tuple(new.router.weight.shape) == (4, 64)
        assert torch.equal(new.router.weight, old.router.weight[keep])
        for name in ("gate_up_proj", "down_proj"):
            assert getattr(new.experts, name).shape[0] == 4
            assert torch.equal(getattr(new.experts, name), getattr(old.experts, name)[keep])
        if arch == "qwen2_moe":  # the shared expert and its gate are never removed
            for n, p in old.module.shared_expert.named_parameters():
                assert torch.equal(p, dict(new.module.shared_expert.named_parameters())[n])
            assert torch.equal(new.module.shared_expert_gate.weight, old.module.shared_expert_gate.weight)
        # router logits of the kept experts are unchanged; tokens routed only to kept experts get the same output
        x = torch.randn(1, 256, 64, generator=g)
        logits_old, logits_new = x[0] @ old.router.weight.T, x[0] @ new.router.weight.T
        torch.testing.assert_close(logits_new, logits_old[:, keep])
        only_kept = torch.isin(logits_old.topk(2, dim=-1).indices, torch.tensor(keep)).all(dim=-1)
        assert only_kept.any()
        y_old, y_new = _block_output(old, x)[0], _block_output(new, x)[0]
        if arch in ("qwen3_moe", "mixtral"):  # top-k weights renormalised: the same output exactly
            torch.testing.assert_close(y_new[only_kept], y_old[only_kept], rtol=1e-5, atol=1e-6)
        else:  # softmax over the experts left: same experts, weights scaled by the lost probability mass
            assert not torch.allclose(y_new[only_kept], y_old[only_kept])
    assert report["params_after"] < report["params_before"]
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        cached = after.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        assert torch.equal(cached, greedy_no_cache(after, ids, 8))


@pytest.mark.parametrize("method", ["reap", "frequency", "ean"])
def test_first_layer_saliency_from_routed_tokens(method, tiny_moe_models, calib_file, tmp_path):
    """Layer 0 sees the calibration tokens unchanged by any pruning: its reported saliency must be the one
    computed independently from the tokens the dense model routes to each expert."""
    from draftkit.checkpoint import load_model_and_tokenizer
    from draftkit.data import calibration_samples
    from draftkit.prune import prune_model

    model, tok = load_model_and_tokenizer(str(tiny_moe_models["qwen3_moe"]))
    cfg = PruneConfig(experts=3, expert_method=method, calib=CalibConfig(path=str(calib_file), **CALIB), batch_size=8)
    samples = calibration_samples(tok, cfg.calib, max_len=256)
    (block,) = moe_blocks(model)[0]
    ex = block.experts
    seen = []
    h = ex.register_forward_pre_hook(lambda m, a: seen.append(a))
    with torch.no_grad():
        by_len = {}
        for s in samples:
            by_len.setdefault(len(s), []).append(s)
        for group in by_len.values():
            model(input_ids=torch.stack(group), use_cache=False)
    h.remove()
    want = torch.zeros(8, dtype=torch.float64)
    count = torch.zeros(8, dtype=torch.float64)
    for hidden, idx, w in seen:
        for j in range(8):
            tok_i, pos = torch.where(idx == j)
            gate, up = torch.nn.functional.linear(hidden[tok_i], ex.gate_up_proj[j]).chunk(2, dim=-1)
            f = torch.nn.functional.linear(ex.act_fn(gate) * up, ex.down_proj[j]).double().norm(dim=-1)
            count[j] += len(tok_i)
            want[j] += {"reap": (w[tok_i, pos].double() * f).sum(), "frequency": len(tok_i), "ean": f.sum()}[method]
    if method == "reap":
        want = want / count.clamp(min=1)
    model, report = prune_model(model, tok, cfg)
    entry = report["experts"]["layers"]["model.layers.0.mlp"]
    assert entry["tokens"] == count.int().tolist()
    torch.testing.assert_close(torch.tensor(entry["saliency"], dtype=torch.float64), want, rtol=1e-5, atol=1e-6)
    assert entry["kept"] == sorted(torch.topk(want, 5).indices.tolist())


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_experts_and_layers_in_one_recipe_stage(arch, tiny_moe_models, calib_file, tmp_path):
    """--experts with --layers: one layer-wise pass, both removed; the KV cache is still right after the drop."""
    cfg = PruneConfig.model_validate({"layers": 1, "experts": 2, "calib": {"path": str(calib_file), **CALIB}})
    out = tmp_path / "p"
    report = run_stage("prune", str(tiny_moe_models[arch]), cfg, out=out)
    assert report["layers_after"] == 3 and len(report["dropped_layers"]) == 1
    assert report["experts"]["experts_after"] == 6
    dropped = report["dropped_layers"][0]
    assert f"model.layers.{dropped}." not in "".join(report["experts"]["layers"])
    assert len(report["experts"]["layers"]) == 3
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 3
    assert all(b.num_experts == 6 for (b,) in moe_blocks(model).values())
    for i, layer in enumerate(decoder_layers(model)):
        assert layer.self_attn.layer_idx == i
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        assert torch.equal(cached, greedy_no_cache(model, ids, 8))


@pytest.mark.parametrize(
    "model,args,needle",
    [
        ("qwen3_moe", ["--experts", "7"], "top_k=2"),
        ("qwen3_moe", ["--experts", "0.05"], "removes 0 of the 8"),
        ("qwen3_moe", ["--experts", "2.5"], "whole number"),
        ("llama", ["--experts", "0.5"], "no routed experts"),
    ],
)
def test_bad_expert_counts_are_one_line(model, args, needle, tiny_moe_models, tiny_models, tmp_path):
    src = tiny_moe_models.get(model) or tiny_models[model]
    res = runner.invoke(app, ["prune", str(src), *args, "-o", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_grouped_routing_stays_valid(tiny_tokenizer_dir, calib_file, tmp_path):
    """DeepSeek-V3-style grouped routing (n_group groups, topk_group of them per token): the same number of
    experts leaves each group, the score-correction bias is sliced with the router, and a count that would
    leave unequal groups is refused."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = tf.DeepseekV3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    src = tmp_path / "ds"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for (b,) in moe_blocks(model).values():
            b.router.e_score_correction_bias.copy_(torch.arange(8.0) / 100)
    model.save_pretrained(src)
    tok.save_pretrained(src)
    res = runner.invoke(app, ["prune", str(src), "--experts", "3", "-o", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "multiple of 2" in res.output, res.output
    cfg = PruneConfig(experts=4, calib=CalibConfig(path=str(calib_file), **CALIB))
    report = run_stage("prune", str(src), cfg, out=tmp_path / "p")
    pruned = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert pruned.config.n_routed_experts == 4 and pruned.config.n_group == 2
    for i, (b,) in moe_blocks(pruned).items():
        keep = report["experts"]["layers"][f"model.layers.{i}.mlp"]["kept"]
        assert sum(j < 4 for j in keep) == 2 and sum(j >= 4 for j in keep) == 2
        torch.testing.assert_close(b.router.e_score_correction_bias, torch.tensor(keep, dtype=torch.float32) / 100)
        assert tuple(b.router.weight.shape) == (4, 64) and b.experts.gate_up_proj.shape[0] == 4
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=torch.tensor([[1, 5, 9, 13]])).logits).all()


def test_recipe_prunes_experts_then_sparsifies(tiny_moe_models, calib_file, tmp_path):
    """A recipe with prune (experts and a block) then sparsify, through ``draftkit run`` (preflight included)."""
    recipe = tmp_path / "moe.yaml"
    recipe.write_text(
        f"name: moe\nmodel: {tiny_moe_models['olmoe']}\noutput: {tmp_path / 'run'}\nstages:\n"
        f"  - prune: {{layers: 1, experts: 0.25, expert_method: ean, calib: {{path: {calib_file}, samples: 8, seqlen: 48}}}}\n"
        f"  - sparsify: {{sparsity: 0.5, method: wanda, calib: {{path: {calib_file}, samples: 8, seqlen: 48}}}}\n"
    )
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "report.json").is_file()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "01-sparsify")
    assert final.config.num_experts == 6 and final.config.num_hidden_layers == 3
    for (b,) in moe_blocks(final).values():
        w = b.experts.gate_up_proj
        assert w.shape[0] == 6 and int((w == 0).sum()) == w.numel() // 2
