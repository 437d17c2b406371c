"""Speculative sampling (``draftkit spec --temperature T``): the rejection rule of Leviathan et al. (2023) /
Chen et al. (2023) keeps the target's distribution, checked on explicit distributions and on a tiny model's
first token; the report gives MAL under sampling; the cost model never promises a self-draft a speedup."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.evaluate.decoding import speculative_accept, speculative_generate
from draftkit.evaluate.proposers import SameVocabProposer, Timer
from draftkit.evaluate.spec import SpecConfig, run_spec
from tests._helpers_export_eval import single_thread, write_jsonl
from tests.conftest import make_rows, make_tiny_model

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def pair(tiny_llama, tiny_tokenizer_dir, tmp_path_factory):
    target = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    draft = AutoModelForCausalLM.from_pretrained(
        make_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("sd") / "d", layers=2, seed=3)).eval()
    return target, draft, AutoTokenizer.from_pretrained(tiny_llama)


def test_rejection_rule_keeps_the_target_distribution():
    p = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=gen))
        a, nxt = speculative_accept(p, q, [x], gen)
        counts[x if a == 1 else nxt] += 1
    assert torch.allclose(counts / n, p[0], atol=0.015)  # first token ~ p, not q
    assert speculative_accept(p, p[:1], [0], gen)[0] == 1  # q == p: always accepted


def test_first_token_frequencies_follow_the_target(pair):
    target, draft, tok = pair
    temp = 0.1  # the tiny random models' logits are flat; a low temperature gives a few likely tokens
    ids = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 apples."}], add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    with torch.no_grad():
        p = torch.softmax(target(torch.tensor([ids])).logits[0, -1].float() / temp, -1)
        q = torch.softmax(draft(torch.tensor([ids])).logits[0, -1].float() / temp, -1)
    gen = torch.Generator().manual_seed(1)
    n = 800
    counts = torch.zeros_like(p)
    drafted = 0
    for _ in range(n):
        prop = SameVocabProposer(draft, Timer(), temperature=temp, generator=gen)
        res = speculative_generate(target, prop, ids, k=1, max_new_tokens=2, temperature=temp, generator=gen)
        counts[res["tokens"][0]] += 1
        drafted += res["steps"][0] == (1, 1)
    groups = sorted(set(p.topk(5).indices.tolist()) | set(q.topk(5).indices.tolist()))
    emp = torch.tensor([counts[g] / n for g in groups] + [1 - sum(counts[g] for g in groups) / n])
    want = torch.tensor([p[g] for g in groups] + [1 - sum(p[g] for g in groups)])
    wrong = torch.tensor([q[g] for g in groups] + [1 - sum(q[g] for g in groups)])
    assert (emp - want).abs().max() < 0.06, (emp, want)
    assert (wrong - want).abs().max() > 0.1  # the test tells the target's distribution from the draft's
    assert 0 < drafted < n  # some first tokens came from accepted drafts, some from the residual


def test_spec_temperature_reports_mal_under_sampling(pair, tmp_path):
    target, draft, tok = pair
    prompts = write_jsonl(tmp_path / "p.jsonl", make_rows(2, seed=5))
    cfg = SpecConfig(target="unused", prompts=str(prompts), k=3, max_new_tokens=12, temperature=0.8, seed=3)
    r = run_spec(target, tok, target, tok, cfg)  # a self-draft under sampling: p == q, every proposal kept
    assert r["temperature"] == 0.8 and "lossless" not in r
    assert r["mal_per_step"] == 4 and r["acceptance_by_position"] == [1.0] * 3
    r2 = run_spec(draft, tok, target, tok, cfg)
    assert 1.0 <= r2["mal"] <= 4.0 and r2 == run_spec(draft, tok, target, tok, cfg) | {"spec_seconds": r2["spec_seconds"],
                                                                                         "draft_forward_ms": r2["draft_forward_ms"],
                                                                                         "target_verify_forward_ms": r2["target_verify_forward_ms"],
                                                                                         # timed on the device
                                                                                         "cost_model": r2["cost_model"],
                                                                                         "predicted_speedup": r2["predicted_speedup"]}


def test_cost_model_like_against_like(pair, tmp_path):
    """A self-draft never shows an expected speedup above 1; only decode forwards are timed (no prefill);
    conditional acceptance counts only positions actually proposed (tail steps propose fewer)."""
    target, _, tok = pair
    prompts = write_jsonl(tmp_path / "p.jsonl", make_rows(2, seed=6))
    k = 3
    cfg = SpecConfig(target="unused", prompts=str(prompts), k=k, max_new_tokens=4 * (k + 1) + 2, stop_at_eos=False)
    r = run_spec(target, tok, target, tok, cfg)
    assert all(v <= 1.0 + 1e-12 for key, v in r.items() if key.startswith("expected_speedup") and v is not None)
    assert r["draft_forwards"] == sum(r["proposed_by_position"])  # no prefill among the timed draft forwards
    assert r["conditional_acceptance_by_position"] == [1.0] * k
    assert r["acceptance_by_position"] == [1.0] * k and r["mal_per_step"] == k + 1


def test_spec_cli_temperature(tiny_llama, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", make_rows(1, seed=7))
    result = CliRunner().invoke(app, ["spec", str(tiny_llama), "--target", str(tiny_llama), "--prompts", str(prompts),
                                      "--k", "2", "--max-new-tokens", "6", "--temperature", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["temperature"] == 0.5 and report["mal_per_step"] == 3
