"""Speculative decoding: exact counts (a model drafting for itself reaches MAL = k+1), lossless output for
same- and cross-tokenizer pairs, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.evaluate.spec import SpecConfig, run_spec
from tests._helpers_export_eval import build_other_tokenizer, single_thread, write_jsonl
from tests.conftest import make_rows, make_tiny_model

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", make_rows(2, seed=5))


@pytest.fixture(scope="module")
def target(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def other_draft(tiny_tokenizer_dir, tmp_path_factory):
    """Same tokenizer, different weights and depth."""
    path = make_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("draft") / "d", layers=2, seed=3)
    return path


@pytest.fixture(scope="module")
def cross_draft(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    build_other_tokenizer(root / "tok")
    return make_tiny_model("qwen2", root / "tok", root / "draft", layers=2, seed=4)


@pytest.mark.parametrize("k", [1, 3])
def test_self_draft_mal_is_k_plus_one(k, target, prompts_file):
    model, tok = target
    cfg = SpecConfig(target="unused", prompts=str(prompts_file), k=k, max_new_tokens=4 * (k + 1), stop_at_eos=False)
    r = run_spec(model, tok, model, tok, cfg)
    assert r["mode"] == "same"
    assert r["committed_tokens"] == 2 * 4 * (k + 1)
    assert r["target_forwards"] == 2 * 4
    assert r["mal"] == k + 1
    assert r["acceptance_by_position"] == [1.0] * k
    assert r["lossless"] is True and r["lossless_prompts"] == 2
    assert r["cost_ratio_macs"] == pytest.approx(1.0)
    assert r["expected_speedup_macs"] == pytest.approx((k + 1) / (k + 1))


def test_same_tokenizer_pair_is_lossless(target, other_draft, prompts_file):
    model, tok = target
    draft = AutoModelForCausalLM.from_pretrained(other_draft).eval()
    cfg = SpecConfig(target="unused", prompts=str(prompts_file), k=4, max_new_tokens=20)
    r = run_spec(draft, AutoTokenizer.from_pretrained(other_draft), model, tok, cfg)
    assert r["mode"] == "same" and r["lossless"] is True
    assert 1.0 <= r["mal"] <= 5.0
    assert r["cost_ratio_macs"] < 1.0
    steps_tokens = r["committed_tokens"]
    assert steps_tokens == pytest.approx(r["mal"] * r["target_forwards"])


def test_cross_tokenizer_pair_is_lossless(target, cross_draft, prompts_file):
    model, tok = target
    draft = AutoModelForCausalLM.from_pretrained(cross_draft).eval()
    cfg = SpecConfig(target="unused", prompts=str(prompts_file), k=3, max_new_tokens=16)
    r = run_spec(draft, AutoTokenizer.from_pretrained(cross_draft), model, tok, cfg)
    assert r["mode"] == "text" and r["lossless"] is True and r["lossless_prompts"] == 2
    # a cross-tokenizer self-draft: the target's text through another tokenizer still verifies losslessly
    with pytest.raises(Exception, match="--mode text"):
        run_spec(draft, AutoTokenizer.from_pretrained(cross_draft), model, tok, cfg.model_copy(update={"mode": "same"}))


def test_cross_tokenizer_self_text_mode_accepts(target, prompts_file):
    """The target drafting for itself through text re-tokenization accepts (almost) everything."""
    model, tok = target
    cfg = SpecConfig(target="unused", prompts=str(prompts_file), k=2, max_new_tokens=12, mode="text", stop_at_eos=False)
    r = run_spec(model, tok, model, tok, cfg)
    assert r["mode"] == "text" and r["lossless"] is True
    assert r["mal"] > 1.0  # not k+1: random text re-tokenizes differently from the ids that made it


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_spec_cli_json(compute, tiny_llama, other_draft, prompts_file, tmp_path, monkeypatch):
    """Greedy spec is lossless in either compute dtype: the target's reference and its verification of the
    draft run in the same one (the target and the draft both load in it)."""
    import draftkit.checkpoint as checkpoint

    loaded = []
    original = checkpoint.load_model_and_tokenizer

    def recording(name, **kw):
        loaded.append(kw.get("dtype"))
        return original(name, **kw)

    monkeypatch.setattr(checkpoint, "load_model_and_tokenizer", recording)
    monkeypatch.setattr("draftkit.stages.load_model_and_tokenizer", recording)
    result = CliRunner().invoke(app, ["spec", str(other_draft), "--target", str(tiny_llama), "--prompts", str(prompts_file),
                                      "--k", "2", "--max-new-tokens", "8", "--json", "-o", str(tmp_path / "rep"),
                                      "--compute-dtype", compute])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["lossless"] is True and report["k"] == 2 and report["compute"] == compute
    assert loaded == [compute, compute]  # the draft, then the target
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["report"]["mal"] == report["mal"]


@pytest.mark.parametrize("case", ["k0", "empty", "nocolumn", "missing"])
def test_spec_bad_input_one_line(case, tiny_llama, tmp_path):
    prompts = tmp_path / "p.jsonl"
    args = ["spec", str(tiny_llama), "--target", str(tiny_llama), "--prompts", str(prompts)]
    if case == "k0":
        write_jsonl(prompts, [{"prompt": "hi"}])
        args += ["--k", "0"]
    elif case == "empty":
        prompts.write_text("")
    elif case == "nocolumn":
        write_jsonl(prompts, [{"foo": "bar"}])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error:")
    expected = {"k0": "k:", "empty": "empty", "nocolumn": "no prompt column", "missing": "does not exist"}[case]
    assert expected in result.output


def test_spec_output_equals_transformers_generate(target, other_draft, cross_draft):
    """The reference here is transformers' own greedy generate, not draftkit's loop."""
    import torch

    from draftkit.evaluate.spec import (
        SameVocabProposer,
        TextProposer,
        _Timer,
        encode_prompt,
        speculative_generate,
    )

    model, tok = target
    text = tok.apply_chat_template([{"role": "user", "content": make_rows(1, seed=21)[0]["question"]}],
                                   add_generation_prompt=True, tokenize=False)
    ids = encode_prompt(tok, text)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].tolist()
    draft = AutoModelForCausalLM.from_pretrained(other_draft).eval()
    res = speculative_generate(model, SameVocabProposer(draft, _Timer()), ids, k=3, max_new_tokens=24)
    assert res["tokens"] == ref
    xdraft = AutoModelForCausalLM.from_pretrained(cross_draft).eval()
    proposer = TextProposer(xdraft, _Timer(), AutoTokenizer.from_pretrained(cross_draft), tok, text, len(ids))
    assert speculative_generate(model, proposer, ids, k=3, max_new_tokens=24)["tokens"] == ref


def test_no_text_fallback_for_a_tokenizer_with_unknown_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from draftkit.errors import InvalidInputError
    from draftkit.evaluate.spec import check_text_fallback

    word = Tokenizer(models.WordLevel({"<unk>": 0, "Tom": 1, "has": 2}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>")
    check_text_fallback(tok, ["Tom has"])  # representable: fine
    with pytest.raises(InvalidInputError, match="no text fallback"):
        check_text_fallback(tok, ["Tom has 3 apples"])
