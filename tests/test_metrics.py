"""Metrics that measure what they claim: perplexity on response tokens of chat rows, acceptance statistics
that count only proposed positions, a replay of greedy verification equal to the real decoding loop."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from draftkit.evaluate.acceptance import acceptance_stats, greedy_steps
from draftkit.evaluate.perplexity import perplexity
from tests._helpers_export_eval import single_thread, write_jsonl
from tests.conftest import make_rows, make_tiny_model

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


def _manual_response_nll(model, tok, rows):
    """Reference: render prompt and conversation, score only the tokens after the prompt."""
    nll, n = 0.0, 0
    for r in rows:
        msgs = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(msgs, tokenize=False)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = p + tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        tgt = torch.tensor(ids[1:])
        lp = logp.gather(-1, tgt[:, None])[:, 0]
        nll -= float(lp[len(p) - 1:].sum())
        n += len(ids) - len(p)
    return nll, n


def test_chat_rows_score_response_tokens_only(loaded, tmp_path):
    model, tok = loaded
    rows = make_rows(5, seed=31)
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    r = perplexity(model, tok, path, batch_size=2)
    nll, n = _manual_response_nll(model, tok, rows)
    assert r["scored"] == "response" and r["tokens"] == n
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    # the same rows as a list, and as messages rows
    assert perplexity(model, tok, rows)["perplexity"] == pytest.approx(r["perplexity"], rel=1e-5)
    msgs = [{"messages": [{"role": "user", "content": x["question"]}, {"role": "assistant", "content": x["answer"]}]}
            for x in rows]
    assert perplexity(model, tok, msgs)["tokens"] == n


def test_plain_text_scores_every_token(loaded, tmp_path):
    model, tok = loaded
    path = tmp_path / "t.txt"
    path.write_text("Tom has 3 apples and buys 4 more, so he has 7 apples.")
    r = perplexity(model, tok, path, seqlen=256)
    ids = tok(path.read_text())["input_ids"]
    assert r["scored"] == "all" and r["tokens"] == len(ids) - 1


def test_eval_ppl_uses_the_response_only_perplexity(loaded, tmp_path):
    """`draftkit eval --ppl rows.jsonl` on chat rows: response tokens only (the prompt is never scored)."""
    from draftkit.evaluate import EvalConfig, evaluate

    model, tok = loaded
    rows = make_rows(4, seed=32)
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    rep = evaluate(model, tok, EvalConfig(ppl=str(path)))
    nll, n = _manual_response_nll(model, tok, rows)
    assert rep["tasks"]["perplexity"]["tokens"] == n
    assert rep["tasks"]["perplexity"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_benchmarks_use_the_package_perplexity():
    """No benchmark keeps a perplexity of its own."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    for path in root.glob("*.py"):
        assert "def perplexity" not in path.read_text(), path.name
    for name in ("sparsify_quality.py", "sd2_smollm2.py", "sparsify_vs_llmcompressor.py"):
        assert "draftkit.evaluate.perplexity import perplexity" in (root / name).read_text(), name


def test_llmcompressor_benchmark_times_the_same_scope_for_both_tools():
    """Both tools are timed as whole processes by one function (saved model + text file -> saved output);
    no worker starts its own clock after loading the model (the old benchmark timed llm-compressor's oneshot
    only, and draftkit's sparsify only)."""
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "sparsify_vs_llmcompressor.py"
    tree = ast.parse(path.read_text())
    funcs = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    for worker in ("llmc_worker", "eval_worker"):
        assert "perf_counter" not in ast.unparse(funcs[worker]), worker
    compare = ast.unparse(funcs["compare"])
    timed_calls = [c for c in ast.walk(funcs["compare"]) if isinstance(c, ast.Call) and ast.unparse(c.func) == "timed"]
    assert len(timed_calls) == 2, compare
    draftkit_cmd, llmc_cmd = sorted((ast.unparse(c) for c in timed_calls), key=lambda c: "'llmc'" in c)
    assert "'sparsify'" in draftkit_cmd and "str(calib)" in draftkit_cmd and "'-o'" in draftkit_cmd
    assert "'llmc'" in llmc_cmd and "str(calib)" in llmc_cmd and "'--output'" in llmc_cmd
    assert "output_dir=args.output" in ast.unparse(funcs["llmc_worker"])


def test_acceptance_counts_only_proposed_positions():
    # k = 3; the last step proposed 1 token (tail), accepted it
    steps = [(3, 3), (3, 1), (1, 1)]
    s = acceptance_stats(steps, 3, committed=4 + 2 + 2)
    assert s["proposed_by_position"] == [3, 2, 2]
    assert s["acceptance_by_position"] == [1.0, 0.5, 0.5]
    # conditional at position 2: steps that proposed it and accepted position 1 -> only the first
    assert s["conditional_acceptance_by_position"] == [1.0, 0.5, 1.0]
    assert s["mal_per_step"] == pytest.approx(1 + (3 + 1) / 2)  # the tail step is not a full step
    assert s["mal"] == pytest.approx(8 / 3)


def test_greedy_replay_equals_the_decoding_loop(loaded, tiny_tokenizer_dir, tmp_path):
    """Steps replayed from the target's greedy output and a teacher-forced draft forward equal the steps of
    speculative_generate, for a self-draft (MAL = k+1 on full steps) and another draft."""
    from draftkit.evaluate.spec import SameVocabProposer, _Timer, greedy_generate, speculative_generate

    target, tok = loaded
    draft = AutoModelForCausalLM.from_pretrained(
        make_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "d", layers=2, seed=3)).eval()
    text = tok.apply_chat_template([{"role": "user", "content": make_rows(1, seed=40)[0]["question"]}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    k, max_new = 3, 22
    ref = greedy_generate(target, ids, max_new_tokens=max_new + k, eos_token_id=None)
    for d, self_draft in ((target, True), (draft, False)):
        with torch.no_grad():
            logits = d(input_ids=torch.tensor([ids + ref])).logits[0]
        draft_next = logits[len(ids) - 1:].argmax(-1).tolist()
        steps, committed = greedy_steps(draft_next, ref, k=k, max_new_tokens=max_new)
        real = speculative_generate(target, SameVocabProposer(d, _Timer()), ids, k=k, max_new_tokens=max_new)
        assert steps == real["steps"] and committed == len(real["tokens"]) == max_new
        if self_draft:
            assert acceptance_stats(steps, k)["mal_per_step"] == k + 1
