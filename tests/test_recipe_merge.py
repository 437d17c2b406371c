"""The ``merge`` stage in recipes: it names its inputs (stages of the recipe by index, folder or name, or
model paths), resumes by its inputs' content, and preflight checks its references."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from draftkit.errors import InvalidInputError
from draftkit.merge import maths
from draftkit.pipeline import plan, run
from draftkit.preflight import PreflightError
from draftkit.recipe import load_recipe
from tests.conftest import make_tiny_model


def _write(tmp_path, model, stages, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"name": "m", "model": str(model), "output": str(tmp_path / "run"),
                                 "load": {"device": "cpu"}, "stages": stages}, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def other(tiny_tokenizer_dir, tmp_path_factory):
    return make_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("other") / "m", layers=6, seed=5)


def test_merge_stage_reads_a_stage_and_a_path_and_resumes(tiny_llama, other, tmp_path):
    rec = _write(tmp_path, tiny_llama, [
        {"prune": {"drop": "5"}},
        {"merge": {"models": ["prune", str(tmp_path / "pruned-other")], "method": "linear", "weights": [3, 1]}},
        {"export": {"format": "dense"}},
    ])
    import shutil

    from typer.testing import CliRunner

    from draftkit.cli import app

    r = CliRunner().invoke(app, ["prune", str(other), "--drop", "5", "-o", str(tmp_path / "pruned-other"), "-q"])
    assert r.exit_code == 0, r.output
    report = run(load_recipe(str(rec)))
    out = tmp_path / "run"
    assert [s["status"] for s in report["stages"]] == ["done"] * 3
    a = load_file(out / "00-prune" / "model.safetensors")
    b = load_file(tmp_path / "pruned-other" / "model.safetensors")
    m = load_file(out / "01-merge" / "model.safetensors")
    for k in m:
        torch.testing.assert_close(m[k], maths.linear([a[k], b[k]], [3, 1]), rtol=0, atol=1e-6)
    prov = json.loads((out / "01-merge" / "draftkit.json").read_text())
    assert [i["model"] for i in prov["inputs"]] == [str(out / "00-prune"), str(tmp_path / "pruned-other")]
    assert prov["inputs"][0]["provenance"]["stage"] == "prune"
    # the next stage reads the merge
    assert json.loads((out / "02-export" / "draftkit.json").read_text())["source_model"] == str(out / "01-merge")

    assert [s["skipped"] for s in run(load_recipe(str(rec)))["stages"]] == [True] * 3
    assert [r["action"] for r in plan(load_recipe(str(rec)))["stages"]] == ["skip"] * 3
    # a changed input outside the recipe reruns the merge and what follows, not the prune
    shutil.rmtree(tmp_path / "pruned-other")
    r = CliRunner().invoke(app, ["prune", str(other), "--drop", "4", "-o", str(tmp_path / "pruned-other"), "-q"])
    assert r.exit_code == 0, r.output
    rows = plan(load_recipe(str(rec)))["stages"]
    assert [r["action"] for r in rows] == ["skip", "run", "run"] and "input model changed" in rows[1]["why"]
    assert [s["skipped"] for s in run(load_recipe(str(rec)))["stages"]] == [True, False, False]


@pytest.mark.parametrize("models, message", [
    (["00-prune"], "at least two models"),
    (["00-prune", "/no/such/model"], "/no/such/model"),
    (["00-prune", "03-prune"], "does not run before it"),
    (["00-prune", "01-eval"], "writes no model"),
])
def test_preflight_checks_merge_references(tiny_llama, tmp_path, models, message):
    rec = _write(tmp_path, tiny_llama, [
        {"prune": {"drop": "5"}},
        {"eval": {"tasks": ["tiny-arith"]}},
        {"merge": {"models": models}},
        {"prune": {"drop": "1"}},
    ])
    with pytest.raises((PreflightError, InvalidInputError)) as err:
        run(load_recipe(str(rec)))
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


def test_ambiguous_stage_name(tiny_llama, tmp_path):
    rec = _write(tmp_path, tiny_llama, [
        {"prune": {"drop": "5"}},
        {"prune": {"drop": "4"}},
        {"merge": {"models": ["prune", "00-prune"]}},
    ])
    with pytest.raises((PreflightError, InvalidInputError), match="ambiguous"):
        run(load_recipe(str(rec)))
