"""`spec --engine hf`: transformers' assisted generation timed against the target alone, k fixed as asked, the
Universal Assisted Generation path for another tokenizer, and the report's engine fields; `--engine vllm` fails
as one line where vLLM or a GPU is missing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.evaluate.decoding import greedy_generate
from draftkit.evaluate.engines import run_hf
from draftkit.evaluate.proposers import encode_prompt
from draftkit.evaluate.spec import SpecConfig, read_prompts, run_spec
from tests._helpers_export_eval import build_other_tokenizer, single_thread, write_jsonl
from tests.conftest import make_rows, make_tiny_model

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", make_rows(3, seed=11))


@pytest.fixture(scope="module")
def target(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def draft(tiny_tokenizer_dir, tmp_path_factory):
    path = make_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("draft") / "d", layers=2, seed=3)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def cross_draft(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    build_other_tokenizer(root / "tok")
    path = make_tiny_model("qwen2", root / "tok", root / "draft", layers=2, seed=4)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _ids(tok, prompts_file) -> list[list[int]]:
    return [encode_prompt(tok, t) for t in read_prompts(str(prompts_file), tok)]


class _Lengths:
    """Tokens fed to each forward of a model, recorded by a test-side hook."""

    def __init__(self, model):
        self.model, self.lengths = model, []

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(
            lambda m, a, kw: self.lengths.append(kw["input_ids"].shape[-1]), with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_hf_output_equals_target_greedy(target, draft, prompts_file):
    model, tok = target
    ids = _ids(tok, prompts_file)
    r = run_hf(draft[0], draft[1], model, tok, ids, k=3, max_new_tokens=20, eos_token_id=None, mode="same", repeats=2)
    assert r["engine"] == "hf" and r["repeats"] == 2
    assert r["outputs_identical"] is True and r["identical_prompts"] == 3 and r["differing_prompts"] == []
    assert len(r["speedup_by_repeat"]) == 2 and r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
    assert r["speedup"] == pytest.approx(r["spec_tokens_per_s"] / r["target_tokens_per_s"], rel=0.5)
    # the draft really drafted (3 per round); a random draft accepts little, so about one round per token
    assert r["engine_draft_forwards"] >= 2.5 * r["engine_target_forwards"]
    assert r["engine_target_forwards"] <= 3 * 20
    # the reference is draftkit's own greedy loop, independent of transformers' generate
    assert greedy_generate(model, ids[0], max_new_tokens=20) == _assisted_tokens(model, draft[0], ids[0], 3, 20)


def _assisted_tokens(model, draft, ids, k, n):
    from draftkit.evaluate.engines import _assistant_settings

    old = _assistant_settings(draft, k)
    try:
        out = model.generate(torch.tensor([ids]), assistant_model=draft, max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    finally:
        draft.generation_config = old
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("k", [2, 4])
def test_hf_k_is_fixed_as_asked(k, target, prompts_file):
    """A self-draft accepts everything, so each round commits exactly k+1 tokens: 4 rounds make 4(k+1) tokens.
    transformers' defaults (heuristic schedule, confidence stop 0.4) would change the round count."""
    model, tok = target
    self_draft = copy.deepcopy(model)
    ids = _ids(tok, prompts_file)[:2]
    with _Lengths(model) as seen:
        r = run_hf(self_draft, tok, model, tok, ids, k=k, max_new_tokens=4 * (k + 1), eos_token_id=None, mode="same",
                   repeats=1)
    assert r["engine_target_forwards"] == 2 * 4
    assert r["engine_tokens_per_target_forward"] == k + 1
    assert r["outputs_identical"] is True
    # every verification forward after a prompt's first fed the pending token and exactly k proposals
    verify = [n for n in seen.lengths if n > 1 and n not in {len(i) + k for i in ids} and n not in {len(i) for i in ids}]
    assert verify and set(verify) == {k + 1}


def test_hf_universal_assisted_other_tokenizer(target, cross_draft, prompts_file):
    model, tok = target
    xdraft, xtok = cross_draft
    assert xtok.get_vocab() != tok.get_vocab()
    ids = _ids(tok, prompts_file)
    r = run_hf(xdraft, xtok, model, tok, ids, k=3, max_new_tokens=16, eos_token_id=None, mode="text", repeats=1)
    assert r["outputs_identical"] is True and r["identical_prompts"] == 3
    assert r["engine_draft_forwards"] > 0


def test_spec_engine_hf_report(target, draft, prompts_file):
    model, tok = target
    cfg = SpecConfig(target="unused", prompts=str(prompts_file), k=3, max_new_tokens=12, engine="hf", repeats=2)
    r = run_spec(draft[0], draft[1], model, tok, cfg)
    assert r["engine"] == "hf" and r["repeats"] == 2 and r["dtype"] == "float32" and r["device"].startswith("cpu")
    assert r["speedup"] == r["speedup"] and r["speedup"] > 0
    assert r["lossless"] is True and r["outputs_identical"] is True
    # the prediction at the run's k is the cost model's S(k) and the comparison uses it
    assert r["predicted_speedup"] == r["cost_model"]["predicted_speedup_by_k"][2]
    assert r["measured_over_predicted"] == pytest.approx(r["speedup"] / r["predicted_speedup"])


def test_spec_cli_engine_hf_json(tiny_llama, prompts_file, tmp_path):
    result = CliRunner().invoke(app, ["spec", str(tiny_llama), "--target", str(tiny_llama), "--prompts", str(prompts_file),
                                      "--k", "2", "--max-new-tokens", "6", "--limit", "2", "--engine", "hf",
                                      "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("engine", "device", "dtype", "repeats", "speedup", "predicted_speedup", "cost_model"):
        assert key in report, key
    assert report["engine"] == "hf" and report["repeats"] == 1 and report["outputs_identical"] is True


def test_spec_cli_engine_hf_renders(tiny_llama, prompts_file):
    result = CliRunner().invoke(app, ["spec", str(tiny_llama), "--target", str(tiny_llama), "--prompts", str(prompts_file),
                                      "--k", "2", "--max-new-tokens", "6", "--limit", "1", "--engine", "hf", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "engine hf (1 repeats)" in result.output and "predicted speedup by k" in result.output


@pytest.mark.parametrize("args, expected", [
    (["--engine", "hf", "--k", "dynamic"], "--k dynamic runs in draftkit's loop only"),
    (["--engine", "hf", "--temperature", "0.5"], "measures greedy decoding"),
    (["--engine", "vllm"], "--engine vllm needs"),
    (["--engine", "trt"], "engine"),
])
def test_spec_engine_bad_input_one_line(args, expected, tiny_llama, prompts_file):
    try:
        import vllm  # noqa: F401

        if args == ["--engine", "vllm"] and torch.cuda.is_available():
            pytest.skip("vLLM and a GPU are here: --engine vllm is valid")
    except ImportError:
        pass
    result = CliRunner().invoke(app, ["spec", str(tiny_llama), "--target", str(tiny_llama), "--prompts",
                                      str(prompts_file), *args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error:"), result.output
    assert expected in result.output


@pytest.mark.gpu
def test_hf_engine_on_cuda(tiny_llama, tiny_tokenizer_dir, prompts_file, tmp_path):
    """On a GPU: the timed engine synchronises, stays lossless and reports the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    path = make_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "d", layers=2, seed=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).cuda().eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    draft = AutoModelForCausalLM.from_pretrained(path).cuda().eval()
    cfg = SpecConfig(target="unused", prompts=str(prompts_file), k=3, max_new_tokens=16, engine="hf", repeats=2)
    r = run_spec(draft, tok, model, tok, cfg)
    assert r["device"].startswith("cuda") and r["outputs_identical"] is True and r["lossless"] is True
    assert r["speedup"] > 0 and r["cost_model"]["v"][0] == 1.0
