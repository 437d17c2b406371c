"""examples/ci/nightly.yml's steps, without GitHub, on the demo: validate offline, run night 1, then night 2 on a
deliberately regressed teacher compared with night 1's report; exit codes, the verdict, the attribution and
readable artifacts are what a CI job relies on."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.recipe import load_recipe
from draftkit.resources import demo_teacher
from tests._helpers_export_eval import single_thread

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "examples" / "ci" / "nightly.yml"
runner = CliRunner()
_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
# the demo scaled down to seconds; its gates (min_recovery, min_mal) stay on, at values night 1 passes
TRIM = ["stages.0.prune.calib.samples=4", "stages.1.sparsify.calib.samples=4", "stages.2.distill.limit=16",
        "stages.2.distill.max_new_tokens=24", "stages.4.eval.limit=8", "stages.4.eval.min_recovery=0.01",
        "stages.5.spec.limit=2", "stages.5.spec.max_new_tokens=12", "stages.5.spec.min_mal=1.0"]


def regressed_teacher(out: Path) -> Path:
    """Tonight's checkpoint went wrong: the demo teacher with as much noise as signal in every weight matrix."""
    shutil.copytree(demo_teacher(), out)
    weights = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    save_file({k: (v + v.std() * torch.randn(v.shape, generator=gen)).contiguous() if v.ndim == 2 else v
               for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def night(ckpt: str, out: Path, previous: Path | None) -> tuple[int, dict]:
    """The workflow's "Validate" and "Run the recipe" steps; returns the run's exit code and its --json report."""
    sets = [a for s in [f"model={ckpt}", f"output={out}", *TRIM] for a in ("--set", s)]
    valid = runner.invoke(app, ["recipes", "validate", "demo", *sets])
    assert valid.exit_code == 0, valid.output
    compare = ["--compare", str(previous)] if previous else []
    res = runner.invoke(app, ["run", "demo", *sets, *compare, "--json"])
    return res.exit_code, json.loads(res.stdout)  # never an empty report.json


def test_the_workflow_runs_a_drafter_recipe_gated_on_mal_and_compares():
    text = WORKFLOW.read_text()
    for step in ("draftkit recipes validate", "draftkit run", "--compare previous/report.json", "--json > report.json",
                 'HF_HUB_OFFLINE: "1"', "DRAFTKIT_CACHE:"):
        assert step in text, step
    recipe = yaml.safe_load(text)["jobs"]["draft"]["env"]["RECIPE"].removeprefix("draftkit/")
    steps = load_recipe(str(ROOT / recipe)).steps
    spec = next(s.config for s in steps if s.name == "spec")
    evaluate = next(s.config for s in steps if s.name == "eval")
    assert spec.min_mal is not None and evaluate.baseline == load_recipe(str(ROOT / recipe)).header.model


def test_two_nights_the_second_with_a_regressed_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the runner has no network
    monkeypatch.setenv("DRAFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    old_umask = os.umask(0o022)
    try:
        code1, night1 = night("demo-teacher", tmp_path / "night-1", None)
        assert code1 == 0 and night1["passed"] is True and "comparison" not in night1
        assert {g["gate"] for g in night1["gates"]} >= {"min_recovery", "min_mal"}
        # the artifact the next night downloads: night 1's report.json, outside its run folder
        (tmp_path / "previous").mkdir()
        shutil.copy(tmp_path / "night-1" / "report.json", tmp_path / "previous" / "report.json")

        bad = regressed_teacher(tmp_path / "ckpt-night-2")
        code2, night2 = night(str(bad), tmp_path / "night-2", tmp_path / "previous" / "report.json")
    finally:
        os.umask(old_umask)
    assert code2 == 3 and night2["passed"] is False
    comp = night2["comparison"]
    assert comp["attribution"] == "target", comp["message"]
    target = next(r for r in comp["metrics"] if r["metric"] == "04-eval baseline tiny-arith exact_match")
    base1 = night1["stages"][4]["report"]["baseline"]["tasks"]["tiny-arith"]["exact_match"]
    assert target["role"] == "target" and target["last"] == base1 and target["now"] < base1 and target["regressed"]
    assert "the target itself regressed" in " ".join(night2["gate_failures"])
    saved = json.loads((tmp_path / "night-2" / "report.json").read_text())
    assert saved["passed"] is False and saved["comparison"]["attribution"] == "target"
    assert "## Night over night" in (tmp_path / "night-2" / "report.md").read_text()
    # readable artifacts: reports and the draft's files follow the umask
    for f in [tmp_path / "night-2" / "report.json", tmp_path / "night-2" / "report.md",
              *(tmp_path / "night-1" / "02-distill").iterdir()]:
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
