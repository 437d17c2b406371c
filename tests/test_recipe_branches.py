"""Recipes that branch: two distill stages start from one prune (``from:``), a merge names both; resume,
fingerprints, the dry-run plan, preflight and the report cover every branch, and a run killed in a branch
resumes where it stopped with the same result as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import draftkit.merge.runner
from draftkit.errors import InvalidInputError
from draftkit.merge import maths
from draftkit.pipeline import plan, run
from draftkit.recipe import RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "tiny" / "data" / "train.jsonl"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """Two small, different SFT sets."""
    root = tmp_path_factory.mktemp("sets")
    lines = TRAIN.read_text().splitlines()
    a, b = root / "a.jsonl", root / "b.jsonl"
    a.write_text("\n".join(lines[:24]) + "\n")
    b.write_text("\n".join(lines[1000:1024]) + "\n")
    return a, b


def _distill(data: Path) -> dict:
    return {"dataset": str(data), "regenerate": False, "epochs": 2, "train_batch_size": 8, "max_length": 96,
            "eval_fraction": 0.0, "lr": 1e-3}


def _recipe(tmp_path: Path, model: Path, a: Path, b: Path, out: str = "run") -> Path:
    p = tmp_path / f"{out}.yaml"
    p.write_text(yaml.safe_dump({
        "name": "branches", "model": str(model), "output": str(tmp_path / out), "load": {"device": "cpu"},
        "stages": [
            {"prune": {"drop": "4-5"}, "name": "pruned"},
            {"distill": _distill(a), "name": "student_a"},
            {"distill": _distill(b), "from": "pruned", "name": "student_b"},
            {"merge": {"models": ["student_a", "student_b"], "method": "slerp", "t": 0.5}},
            {"export": {"format": "dense"}},
        ]}, sort_keys=False))
    return p


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / "model.safetensors")


def test_two_students_of_one_prune_merged(tiny_llama, datasets, tmp_path):
    rec = _recipe(tmp_path, tiny_llama, *datasets)
    report = run(load_recipe(str(rec)))
    out = tmp_path / "run"
    assert [s["status"] for s in report["stages"]] == ["done"] * 5
    # both students start from the prune: their provenance names it, and they differ (different data)
    for d in ("01-distill", "02-distill"):
        assert json.loads((out / d / "draftkit.json").read_text())["source_model"] == str(out / "00-prune")
    a, b, m = (_weights(out / d) for d in ("01-distill", "02-distill", "03-merge"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for k in m:
        torch.testing.assert_close(m[k], maths.slerp(0.5, a[k], b[k]), rtol=0, atol=1e-6)
    assert json.loads((out / "04-export" / "draftkit.json").read_text())["source_model"] == str(out / "03-merge")
    assert report["final_model"] == str(out / "03-merge")
    assert report["stages"][2]["reads"] == [str(out / "00-prune")] and report["stages"][1]["reads"] is None
    assert report["stages"][3]["reads"] == [str(out / "01-distill"), str(out / "02-distill")]
    md = (out / "report.md").read_text()
    assert "| 2 | distill ← 00-prune |" in md and "| 3 | merge ← 01-distill, 02-distill |" in md

    # nothing changed: every branch skipped, in the plan and in the run
    assert [r["action"] for r in plan(load_recipe(str(rec)))["stages"]] == ["skip"] * 5
    assert all(s["skipped"] for s in run(load_recipe(str(rec)))["stages"])
    # a change in one branch reruns that branch and what reads it, not the other branch
    changed = load_recipe(str(rec), overrides=["stages.2.distill.lr=0.002"])
    assert [r["action"] for r in plan(changed)["stages"]] == ["skip", "skip", "run", "run", "run"]
    assert [s["skipped"] for s in run(changed)["stages"]] == [True, True, False, False, False]
    changed = load_recipe(str(rec), overrides=["stages.1.distill.lr=0.002", "stages.2.distill.lr=0.002"])
    rows = plan(changed)["stages"]
    assert [r["action"] for r in rows] == ["skip", "run", "skip", "run", "run"]
    # the prune changed: both branches and the merge rerun
    changed = load_recipe(str(rec), overrides=["stages.0.prune.drop=3-4"])
    assert [r["action"] for r in plan(changed)["stages"]] == ["run"] * 5


def test_killed_in_a_branch_resumes_to_the_same_result(tiny_llama, datasets, tmp_path, monkeypatch):
    rec_ref = _recipe(tmp_path, tiny_llama, *datasets, out="ref")
    run(load_recipe(str(rec_ref)))
    rec = _recipe(tmp_path, tiny_llama, *datasets, out="killed")
    real = draftkit.merge.runner.merge_checkpoints

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C in the merge leaves (a SIGKILL leaves "running": same rerun)

    monkeypatch.setattr(draftkit.merge.runner, "merge_checkpoints", killed)
    with pytest.raises(KeyboardInterrupt):
        run(load_recipe(str(rec)))
    out = tmp_path / "killed"
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    assert [manifest[str(i)]["status"] for i in range(3)] == ["done"] * 3
    assert manifest["3"]["status"] in ("failed", "interrupted")
    assert not (out / "03-merge").exists()
    monkeypatch.setattr(draftkit.merge.runner, "merge_checkpoints", real)
    # a SIGKILL during the second branch: its folder half-written, its entry still "running"
    (out / "02-distill").rename(out / ".02-distill.tmp-dead")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["2"]["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))
    rows = plan(load_recipe(str(rec)))["stages"]
    assert [r["action"] for r in rows] == ["skip", "skip", "run", "run", "run"]
    assert rows[2]["why"] == "killed before it finished"
    report = run(load_recipe(str(rec)))
    assert [s["skipped"] for s in report["stages"]] == [True, True, False, False, False]
    for d in ("00-prune", "01-distill", "02-distill", "03-merge", "04-export"):
        want, got = _weights(tmp_path / "ref" / d), _weights(out / d)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), d


@pytest.mark.parametrize("stages, message", [
    ([{"prune": {"drop": "1"}}, {"prune": {"drop": "1"}, "from": "spec"}], "names no earlier stage"),
    ([{"prune": {"drop": "1"}, "from": "1"}, {"prune": {"drop": "1"}}], "does not run before it"),
    ([{"prune": {"drop": "1"}}, {"eval": {"tasks": ["tiny-arith"]}, "name": "e"}, {"prune": {"drop": "1"}, "from": "e"}],
     "writes no model"),
    ([{"prune": {"drop": "1"}, "name": "x"}, {"prune": {"drop": "1"}, "name": "x"}], "already taken"),
    ([{"prune": {"drop": "1"}}, {"prune": {"drop": "1"}}, {"prune": {"drop": "1"}, "from": "prune"}], "ambiguous"),
    ([{"prune": {"drop": "1"}}, {"merge": {"models": ["0", "0"]}, "from": "0"}], "not from:"),
    ([{"prune": {"drop": "1"}, "name": "two words"}], "name"),
    ([{"prune": {"drop": "1"}, "sparsify": {}}], "one-key mapping"),
])
def test_bad_branches_are_one_line(stages, message):
    text = yaml.safe_dump({"name": "t", "model": "m", "output": "o", "stages": stages})
    with pytest.raises((RecipeError, InvalidInputError)) as err:
        parse_recipe(text, filename="r.yaml")
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_preflight_checks_a_branch_against_its_source(tiny_llama, tmp_path):
    """6 layers -> prune 0-3 (2 left) -> prune 0 (1 left): a third prune of layer 1 fits stage 0's output
    (from: 0) but not stage 1's, which a stage without from: reads."""
    from draftkit.preflight import preflight

    def problems(third: dict) -> list:
        text = yaml.safe_dump({"name": "t", "model": str(tiny_llama), "output": str(tmp_path / "o"), "stages": [
            {"prune": {"drop": "0-3"}}, {"prune": {"drop": "0"}}, third]})
        return preflight(parse_recipe(text), environment=False)

    assert problems({"prune": {"drop": "1"}, "from": "0"}) == []
    found = problems({"prune": {"drop": "1"}})
    assert found and "stages[2]" in str(found[0])
