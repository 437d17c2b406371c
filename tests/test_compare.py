"""Night over night (`draftkit run ... --compare PREVIOUS`): tonight's metrics beside the last run's, the
target's own scores apart from the draft's so a regression is attributed, relative gates, report.md and plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.compare import compare, load_previous, run_metrics
from draftkit.errors import GateFailedError, InvalidInputError
from draftkit.pipeline import run
from draftkit.recipe import load_recipe
from tests._helpers_export_eval import single_thread, write_jsonl
from tests.conftest import make_rows

runner = CliRunner()
_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def regressed_copy(model: Path, out: Path, noise: float = 0.5, seed: int = 0) -> Path:
    """A "next night" checkpoint that got worse: the same model with noise added to every weight."""
    shutil.copytree(model, out)
    weights = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    noisy = {k: (v + noise * v.std() * torch.randn(v.shape, generator=gen)).contiguous() if v.ndim == 2 else v
             for k, v in weights.items()}
    save_file(noisy, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("night-data")
    return {"rows": write_jsonl(root / "rows.jsonl", make_rows(8, seed=2)),
            "prompts": write_jsonl(root / "prompts.jsonl", make_rows(2, seed=5))}


def night_recipe(tmp_path: Path, data: dict, **spec) -> str:
    recipe = {
        "name": "nightly", "model": "${env:NIGHTLY_CKPT}", "output": "${env:NIGHTLY_OUT}", "load": {"device": "cpu"},
        "stages": [
            {"prune": {"drop": "1"}},
            {"eval": {"ppl": str(data["rows"]), "ppl_seqlen": 64, "baseline": "${model}", "cache": False}},
            {"spec": {"target": "${model}", "prompts": str(data["prompts"]), "limit": 2, "max_new_tokens": 12,
                      "k": 3, **spec}},
        ],
    }
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def night(monkeypatch, recipe: str, ckpt: Path, out: Path, compare_with: list[str] | None = None, sets=()):
    monkeypatch.setenv("NIGHTLY_CKPT", str(ckpt))
    monkeypatch.setenv("NIGHTLY_OUT", str(out))
    return run(load_recipe(recipe, overrides=list(sets)), compare=compare_with)


def test_target_regression_is_attributed_to_the_target(tiny_llama, data, tmp_path, monkeypatch):
    recipe = night_recipe(tmp_path, data)
    first = night(monkeypatch, recipe, tiny_llama, tmp_path / "night1")
    assert "comparison" not in first
    bad = regressed_copy(tiny_llama, tmp_path / "ckpt2")
    second = night(monkeypatch, recipe, bad, tmp_path / "night2", [str(tmp_path / "night1")])
    comp = second["comparison"]
    rows = {r["metric"]: r for r in comp["metrics"]}
    base = rows["01-eval baseline perplexity perplexity"]
    assert base["role"] == "target" and base["regressed"] and base["now"] > base["last"]
    assert base["last"] == first["stages"][1]["report"]["baseline"]["tasks"]["perplexity"]["perplexity"]
    assert comp["attribution"] == "target" and "the target itself regressed" in comp["message"]
    md = (tmp_path / "night2" / "report.md").read_text()
    assert "## Night over night" in md and "**target**" in md
    saved = json.loads((tmp_path / "night2" / "report.json").read_text())
    assert saved["comparison"]["attribution"] == "target"
    if any(p.endswith("night_over_night.png") for p in saved["plots"]):
        assert (tmp_path / "night2" / "plots" / "night_over_night.png").stat().st_size > 0


def test_draft_regression_with_the_same_target_and_a_relative_gate(tiny_llama, data, tmp_path, monkeypatch):
    recipe = night_recipe(tmp_path, data, max_regression=0.05)
    first = night(monkeypatch, recipe, tiny_llama, tmp_path / "night1")
    skipped = [g for g in first["gates"] if g["gate"] == "max_regression"]
    assert skipped and skipped[0]["passed"] and skipped[0].get("skipped")  # the first night has nothing to compare
    # the second night's draft is worse (3 layers dropped instead of 1), the target is the same checkpoint
    with pytest.raises(GateFailedError) as info:
        night(monkeypatch, recipe, tiny_llama, tmp_path / "night2", [str(tmp_path / "night1" / "report.json")],
              sets=["stages.0.prune.drop=1-3"])
    report = info.value.report  # type: ignore[attr-defined]
    comp = report["comparison"]
    assert comp["attribution"] == "draft" and "the target's own scores held" in comp["message"]
    target_rows = [r for r in comp["metrics"] if r["role"] == "target"]
    assert target_rows and all(r["change"] == 0 for r in target_rows)
    gate = next(g for g in report["gates"] if g["gate"] == "max_regression")
    assert gate["passed"] is False and gate["previous"] == first["stages"][2]["report"]["mal"]
    assert report["passed"] is False and "max_regression" in str(info.value)


def test_compare_is_pure_on_reports_and_bad_paths_fail_before_running(tmp_path):
    def rep(base_ppl, ppl, mal):
        return {"stages": [{"stage": "eval", "report": {
            "tasks": {"perplexity": {"perplexity": ppl}}, "primary": {"perplexity": "perplexity"},
            "baseline": {"tasks": {"perplexity": {"perplexity": base_ppl}}}, "mean_recovery": base_ppl / ppl}},
            {"stage": "spec", "report": {"mal": mal, "acceptance_rate": 0.5}}], "_source": "x/report.json"}

    metrics = run_metrics(rep(4.25, 5.0, 2.127))
    assert metrics["00-eval baseline perplexity perplexity"] == {"value": 4.25, "role": "target", "higher_is_better": False}
    # the night: the target's perplexity 4.25 -> 6.24 and the draft's MAL 2.127 -> 1.581
    comp = compare(rep(6.24, 7.0, 1.581), [rep(4.25, 5.0, 2.127)])
    assert comp["attribution"] == "target" and "01-spec mal 2.127 -> 1.581" in comp["message"]
    held = compare(rep(4.25, 7.0, 1.581), [rep(4.25, 5.0, 2.127)])
    assert held["attribution"] == "draft"
    assert compare(rep(4.25, 5.0, 2.127), [rep(4.25, 5.0, 2.127)])["attribution"] == "none"
    with pytest.raises(InvalidInputError, match="--compare"):
        load_previous([str(tmp_path / "no-such-run")])
    res = runner.invoke(app, ["run", "demo", "--compare", str(tmp_path / "no-such-run"), "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["error"]["exit_code"] == 2
