"""The shipped recipes: every one validates; the demo recipe runs end to end on the shipped teacher
(trimmed here so the default suite stays fast; `-m slow` runs it as shipped)."""

import json
from pathlib import Path

import pytest

from draftkit.pipeline import run
from draftkit.recipe import load_recipe, shipped_recipes

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "examples" / "tiny" / "teacher"


def test_every_shipped_recipe_validates():
    recipes = shipped_recipes()
    assert {"demo", "llama-3.1-8b-prune6-sdd", "sd2-llama-3.2-1b-sparse"} <= set(recipes)
    for name, path in recipes.items():
        rec = load_recipe(str(path))
        assert rec.name == name
        assert rec.steps, name


def test_demo_teacher_is_shipped():
    cfg = json.loads((TEACHER / "config.json").read_text())
    assert cfg["num_hidden_layers"] >= 8
    assert (TEACHER / "model.safetensors").stat().st_size > 1_000_000
    assert json.loads((TEACHER / "eval.json").read_text())["test_exact_match"] > 0


TRIM = [
    "stages.0.prune.calib.samples=16",
    "stages.1.sparsify.calib.samples=16",
    "stages.2.distill.limit=64",
    "stages.2.distill.max_new_tokens=64",
    "stages.4.eval.limit=24",
    "stages.4.eval.min_recovery=0.01", "stages.5.spec.min_mal=1.0",
    "stages.5.spec.limit=3",
    "stages.5.spec.max_new_tokens=24",
]


def _check_demo_run(out: Path, report: dict) -> None:
    names = [s["stage"] for s in report["stages"]]
    assert names == ["prune", "sparsify", "distill", "export", "eval", "spec"]
    assert all(s["status"] == "done" for s in report["stages"])
    prune, sparsify = report["stages"][0]["report"], report["stages"][1]["report"]
    teacher_layers = json.loads((TEACHER / "config.json").read_text())["num_hidden_layers"]
    assert prune["layers_after"] == teacher_layers - 2
    # the distilled student is still exactly as sparse as sparsify left it: masks held fixed
    from draftkit.checkpoint import load_model_and_tokenizer
    from draftkit.sparsify.masks import model_sparsity

    sparse_model, _ = load_model_and_tokenizer(str(out / "01-sparsify"))
    distilled, _ = load_model_and_tokenizer(str(out / "02-distill"))
    assert model_sparsity(distilled)["overall"] == pytest.approx(model_sparsity(sparse_model)["overall"], abs=1e-9)
    assert sparsify["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert (out / "03-export" / "config.json").is_file()
    spec = report["stages"][5]["report"]
    assert 1.0 <= spec["mal"] <= 5.0
    assert (out / "report.md").is_file() and (out / "manifest.json").is_file()


def test_demo_recipe_trimmed_end_to_end(tmp_path):
    rec = load_recipe("demo", overrides=TRIM + [f"output={tmp_path / 'demo'}"])
    report = run(rec)
    _check_demo_run(tmp_path / "demo", report)
    # a second run resumes: every stage is skipped
    again = run(load_recipe("demo", overrides=TRIM + [f"output={tmp_path / 'demo'}"]))
    assert all(s["skipped"] for s in again["stages"])


@pytest.mark.slow
def test_demo_recipe_as_shipped(tmp_path):
    report = run(load_recipe("demo", overrides=[f"output={tmp_path / 'demo'}"]))
    _check_demo_run(tmp_path / "demo", report)
