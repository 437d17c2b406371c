"""Quality gates on every measuring stage (eval per task and mean, spec MAL/acceptance/speedup), the verdict in
every report and in --json (an error object on any failure, never an empty file), and re-judging a stored
stage when only a threshold changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

import draftkit.evaluate.spec
from draftkit.cli import app
from draftkit.errors import DataError, GateFailedError
from draftkit.evaluate import EvalConfig
from draftkit.gates import evaluate_gates, judge, without_gates
from draftkit.pipeline import run
from draftkit.recipe import load_recipe, shipped_recipes
from tests._helpers_export_eval import single_thread, write_jsonl
from tests.conftest import make_rows

runner = CliRunner()
_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "p.jsonl", make_rows(2, seed=5))


def test_task_gate_catches_one_collapsed_task_while_the_mean_passes():
    report = {"recovery": {"a": 1.0, "b": 1.0, "c": 0.4}, "mean_recovery": 0.8}
    cfg = EvalConfig(ppl="x.txt", baseline="b", min_recovery=0.75)
    assert judge("eval", cfg, dict(report))["passed"] is True  # the mean alone lets task c collapse
    both = judge("eval", cfg.model_copy(update={"min_task_recovery": 0.5}), dict(report))
    assert both["passed"] is False and both["gate"]["passed"] is False
    verdicts = {g["metric"]: g["passed"] for g in both["gates"]}
    assert verdicts == {"mean_recovery": True, "recovery[a]": True, "recovery[b]": True, "recovery[c]": False}
    assert "recovery[c] 0.4000 < min_task_recovery 0.5" in both["gate"]["message"]


def test_spec_gates_and_thresholds_left_out_of_the_fingerprint():
    report = {"mal": 2.1, "acceptance_rate": 0.3}
    res = evaluate_gates("spec", {"min_mal": 2.0, "min_acceptance": 0.4}, report)
    assert [(g["gate"], g["value"], g["passed"]) for g in res] == [("min_mal", 2.1, True), ("min_acceptance", 0.3, False)]
    assert evaluate_gates("spec", {"min_speedup": 1.2}, {"speedup": {"median": 1.3}})[0]["passed"] is True
    assert evaluate_gates("spec", {"min_speedup": 1.2}, {})[0]["passed"] is False  # not measured: never a pass
    from draftkit.evaluate.spec import SpecConfig

    assert SpecConfig(target="t", prompts="p.jsonl", engine="hf", min_speedup=1.1).min_speedup == 1.1
    assert without_gates("spec", {"k": 4, "min_mal": 2.0, "min_speedup": None}) == {"k": 4}
    assert without_gates("prune", {"layers": 2}) == {"layers": 2}


def test_spec_min_mal_gate_exit_code_and_json(tiny_llama, prompts):
    args = ["spec", str(tiny_llama), "--target", str(tiny_llama), "--prompts", str(prompts), "--limit", "1",
            "--max-new-tokens", "8", "--k", "2", "--json"]
    failed = runner.invoke(app, args + ["--min-mal", "100"])
    assert failed.exit_code == 3, failed.output
    report = json.loads(failed.stdout)
    assert report["passed"] is False and report["gates"][0]["gate"] == "min_mal"
    assert report["gates"][0]["value"] == report["mal"] and "quality gate failed" in failed.stderr
    passed = runner.invoke(app, args + ["--min-mal", "1", "--min-acceptance", "0.99"])  # a self-draft accepts all
    assert passed.exit_code == 0, passed.output
    ok = json.loads(passed.stdout)
    assert ok["passed"] is True and [g["gate"] for g in ok["gates"]] == ["min_mal", "min_acceptance"]
    assert ok["acceptance_rate"] == 1.0


def test_min_speedup_without_an_engine_is_one_line_exit_2(tiny_llama, prompts):
    res = runner.invoke(app, ["spec", str(tiny_llama), "--target", str(tiny_llama), "--prompts", str(prompts),
                              "--min-speedup", "1.1", "--json"])
    assert res.exit_code == 2
    assert "--min-speedup" in res.stderr and "--engine" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    err = json.loads(res.stdout)
    assert err["passed"] is False and err["error"]["exit_code"] == 2 and "--engine" in err["error"]["message"]


def test_json_error_object_instead_of_an_empty_file(tmp_path):
    res = runner.invoke(app, ["eval", str(tmp_path / "missing"), "--tasks", "tiny-arith", "--json"])
    assert res.exit_code == 2
    assert json.loads(res.stdout)["error"]["exit_code"] == 2
    res = runner.invoke(app, ["run", str(tmp_path / "nope.yaml"), "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["error"]["type"] == "RecipeError"
    # a usage error click reports before any command runs (through the real entry point)
    env = {**os.environ, "DRAFTKIT_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "draftkit", "run", "--no-such-option", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["exit_code"] == 2


def _recipe(tmp_path, model, prompts, **spec):
    data = {"name": "g", "model": str(model), "output": str(tmp_path / "run"), "load": {"device": "cpu"},
            "stages": [{"spec": {"target": str(model), "prompts": str(prompts), "limit": 1, "max_new_tokens": 8,
                                 "k": 2, **spec}}]}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_changed_threshold_rejudges_without_rerunning(tiny_llama, prompts, tmp_path):
    rec = _recipe(tmp_path, tiny_llama, prompts, min_mal=1.0)
    first = run(load_recipe(rec))
    assert first["passed"] is True and first["gates"][0]["gate"] == "min_mal" and not first["stages"][0]["skipped"]
    mal = first["stages"][0]["report"]["mal"]
    with pytest.raises(GateFailedError) as info:
        run(load_recipe(rec, overrides=["stages.0.spec.min_mal=100"]))
    failed = info.value.report  # type: ignore[attr-defined]
    assert failed["stages"][0]["skipped"] is True and failed["stages"][0]["status"] == "gate_failed"
    assert failed["passed"] is False and failed["gates"][0]["value"] == mal and failed["gates"][0]["threshold"] == 100
    out = tmp_path / "run"
    assert json.loads((out / "report.json").read_text())["passed"] is False
    assert json.loads((out / "00-spec" / "report.json").read_text())["report"]["passed"] is False
    assert json.loads((out / "manifest.json").read_text())["stages"]["0"]["status"] == "gate_failed"
    again = run(load_recipe(rec))  # back to the first threshold: passes, still not rerun
    assert again["passed"] is True and again["stages"][0]["skipped"] is True
    assert again["stages"][0]["status"] == "done"
    assert "## Gates: passed" in (out / "report.md").read_text()


def test_a_failed_stage_leaves_a_report_with_the_error(tiny_llama, prompts, tmp_path, monkeypatch):
    def broken(model, tok, cfg):
        raise DataError("prompts vanished")

    monkeypatch.setattr(draftkit.evaluate.spec, "spec_stage", broken)
    with pytest.raises(DataError):
        run(load_recipe(_recipe(tmp_path, tiny_llama, prompts)))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["passed"] is False and report["error"]["exit_code"] == 2
    assert report["failed_stage"] == "00-spec" and "prompts vanished" in report["error"]["message"]


def test_every_shipped_drafter_recipe_gates_on_mal():
    drafters = 0
    for name, path in shipped_recipes().items():
        for step in load_recipe(str(path)).steps:
            if step.name == "spec":
                drafters += 1
                assert step.config.min_mal is not None, f"{name}: its spec stage has no min_mal gate"
    assert drafters >= 3
