"""Evaluation: the local tasks run offline, perplexity scores every token once, recovery and the
--min-recovery gate (exit code 3, report still printed), unknown task names, lm-eval on the in-memory model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.errors import InvalidInputError
from draftkit.evaluate import EvalConfig, evaluate, recovery
from draftkit.evaluate import lmeval as lmeval_mod
from draftkit.evaluate.tasks import extract_answer, perplexity, tiny_arith
from tests._helpers_export_eval import single_thread, write_jsonl
from tests.conftest import make_rows, make_tiny_model

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def arith_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("arith") / "test.jsonl", make_rows(6, seed=11))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "notes.txt"
    path.write_text("\n\n".join(r["question"] + " " + r["answer"] for r in make_rows(4, seed=12)))
    return path


@pytest.fixture(scope="module")
def other_model(tiny_tokenizer_dir, tmp_path_factory):
    return make_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("other") / "m", layers=2, seed=9)


def test_extract_answer():
    assert extract_answer("so 3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer("#### 1,204 and later #### -3") == "-3"
    assert extract_answer("no answer") is None


class _Oracle(torch.nn.Module):
    """A fake LM whose generate() writes the reference answer for every second row: exact match must be 1/2."""

    def __init__(self, tok, answers):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers, self.calls = tok, answers, 0

    def generate(self, input_ids, attention_mask=None, **kw):
        rows = []
        for _ in range(input_ids.shape[0]):
            i = self.calls
            self.calls += 1
            text = f"#### {self.answers[i]}" if i % 2 == 0 else "#### 99999"
            rows.append(self.tok(text, add_special_tokens=False)["input_ids"])
        width = max(map(len, rows))
        gen = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, gen], dim=1)


def test_tiny_arith_scores_exact_match(loaded, arith_file):
    _, tok = loaded
    answers = [extract_answer(r["answer"]) for r in make_rows(6, seed=11)]
    res = tiny_arith(_Oracle(tok, answers), tok, data=arith_file, batch_size=4)
    assert res == {"exact_match": 0.5, "n": 6, "answer_parsed_rate": 1.0}


def test_tiny_arith_runs_offline_on_a_tiny_model(loaded, arith_file):
    model, tok = loaded
    res = tiny_arith(model, tok, data=arith_file, limit=4, batch_size=4, max_new_tokens=8)
    assert res["n"] == 4 and 0.0 <= res["exact_match"] <= 1.0


def test_perplexity_scores_every_token_once(loaded, text_file):
    model, tok = loaded
    n = len(tok(text_file.read_text(), add_special_tokens=True)["input_ids"])
    full = perplexity(model, tok, text_file, seqlen=256, stride=256)
    assert n <= 256 and full["tokens"] == n - 1
    ids = tok(text_file.read_text(), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert full["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    sliding = perplexity(model, tok, text_file, seqlen=64, stride=16)
    assert sliding["tokens"] == n - 1 and sliding["stride"] == 16
    assert math.isfinite(sliding["perplexity"]) and sliding["perplexity"] > 1


def test_recovery_direction():
    assert recovery(0.45, 0.5, "exact_match") == pytest.approx(0.9)
    assert recovery(20.0, 10.0, "perplexity") == pytest.approx(0.5)


def test_baseline_recovery_and_cache(loaded, text_file, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = loaded
    cfg = EvalConfig(ppl=str(text_file), ppl_seqlen=64, baseline=str(tiny_llama), min_recovery=0.99)
    first = evaluate(model, tok, cfg)
    assert first["recovery"]["perplexity"] == pytest.approx(1.0) and first["gate"]["passed"] is True
    assert first["baseline"]["cached"] is False
    second = evaluate(model, tok, cfg)
    assert second["baseline"]["cached"] is True
    assert second["baseline"]["tasks"] == first["baseline"]["tasks"]


def test_gate_exit_code_and_report(tiny_llama, other_model, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    args = ["eval", str(other_model), "--ppl", str(text_file), "--ppl-seqlen", "64", "--baseline", str(tiny_llama), "--json"]
    failed = runner.invoke(app, args + ["--min-recovery", "1000", "-o", str(tmp_path / "rep")])
    assert failed.exit_code == 3, failed.output
    report = json.loads(failed.stdout)
    assert report["gate"]["passed"] is False and report["mean_recovery"] < 1000
    assert "quality gate failed" in failed.stderr
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["report"]["gate"]["passed"] is False
    passed = runner.invoke(app, args + ["--min-recovery", "0.001"])
    assert passed.exit_code == 0, passed.output
    assert json.loads(passed.stdout)["baseline"]["cached"] is True


def test_bad_eval_input_one_line(tiny_llama, tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.setattr(lmeval_mod, "known_tasks", lambda include_path=None, tasks=(): ["arc_easy", "arc_challenge", "hellaswag"])
    monkeypatch.setattr(lmeval_mod, "available", lambda: True)
    r = runner.invoke(app, ["eval", str(tiny_llama), "--tasks", "arc_easyy"])
    assert r.exit_code == 2 and "did you mean arc_easy" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["eval", str(tiny_llama)])
    assert r.exit_code == 2 and "nothing to evaluate" in r.output
    r = runner.invoke(app, ["eval", str(tiny_llama), "--ppl", str(tmp_path / "missing.txt")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["eval", str(tiny_llama), "--ppl", str(tmp_path / "x.txt"), "--min-recovery", "0.9"])
    assert r.exit_code == 2 and "--baseline" in r.output


def test_unknown_task_without_lm_eval(monkeypatch):
    monkeypatch.setattr(lmeval_mod, "available", lambda: False)
    with pytest.raises(InvalidInputError, match=r"draftkit\[eval\]"):
        lmeval_mod.check_tasks(["hellaswag"], local=("tiny-arith",))


MC_TASK = """task: draftkit_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_local_task_on_in_memory_model(loaded, tmp_path):
    pytest.importorskip("lm_eval")
    rows = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1)], "label": 0} for a, b in [(1, 2), (3, 4), (5, 6)]]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "draftkit_tiny_mc.yaml").write_text(MC_TASK.format(data=data))
    model, tok = loaded
    cfg = EvalConfig(tasks=["draftkit_tiny_mc"], include_path=str(tmp_path / "tasks"), batch_size=2)
    from draftkit.evaluate import check_eval

    check_eval(None, cfg)
    report = evaluate(model, tok, cfg)
    acc = report["tasks"]["draftkit_tiny_mc"]["acc"]
    assert report["primary"]["draftkit_tiny_mc"] == "acc" and acc in (0.0, 1 / 3, 2 / 3, 1.0)


@pytest.mark.slow
def test_unknown_lm_eval_task_lists_close_matches_real_index():
    pytest.importorskip("lm_eval")
    with pytest.raises(InvalidInputError, match="did you mean arc_easy"):
        lmeval_mod.check_tasks(["arc_easyy"])
    lmeval_mod.check_tasks(["arc_easy", "hellaswag"])  # known names pass (no dataset download needed)


def test_baseline_cache_is_per_dtype_and_one_cache_variable(tiny_llama, text_file, tmp_path, monkeypatch):
    """A baseline measured in float32 is not reused for a bfloat16 one; DRAFTKIT_CACHE_DIR moves the eval cache and
    the content-hash cache alike (DRAFTKIT_CACHE is read too)."""
    import draftkit.evaluate as ev
    from draftkit.fingerprint import _cache_path

    monkeypatch.delenv("DRAFTKIT_CACHE", raising=False)
    monkeypatch.setenv("DRAFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    measured = []
    monkeypatch.setattr(ev, "measure", lambda name, cfg, load: measured.append(load.dtype) or {"perplexity": {"perplexity": 2.0}})
    cfg = EvalConfig(ppl=str(text_file), ppl_seqlen=64, baseline=str(tiny_llama))
    assert ev.baseline_results(cfg, load_dtype="float32")[1] is False
    assert ev.baseline_results(cfg, load_dtype="float32")[1] is True
    assert ev.baseline_results(cfg, load_dtype="bfloat16")[1] is False
    assert measured == ["float32", "bfloat16"]
    assert ev._cache_file(cfg, "float32").is_relative_to(tmp_path / "cache")
    assert _cache_path() == tmp_path / "cache" / "content-hashes.json"
    monkeypatch.delenv("DRAFTKIT_CACHE_DIR")
    monkeypatch.setenv("DRAFTKIT_CACHE", str(tmp_path / "other"))
    assert ev._cache_file(cfg, "float32").is_relative_to(tmp_path / "other")
