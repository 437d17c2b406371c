"""The shipped SD² recipe for SmolLM2-135M-Instruct: it validates as shipped, and it runs end to end from a GGUF
file. CI has no SmolLM2, so the run uses a stand-in: the tiny Llama of the fixtures written as a GGUF with the
``gguf`` package (tests/_helpers_gguf.py), with the data, sizes and prune depth scaled down by ``--set``; every
other setting (template, accept_filter off, k, lr, ...) is the shipped one."""

from __future__ import annotations

import json

import pytest

from draftkit.pipeline import run
from draftkit.recipe import load_recipe, shipped_recipes
from tests._helpers_export_eval import write_jsonl
from tests.conftest import make_rows


def test_sd2_recipe_validates_as_shipped():
    rec = load_recipe(str(shipped_recipes()["sd2-smollm2-135m"]))
    assert rec.header.model.endswith(".gguf")
    distill = next(s for s in rec.steps if s.name == "distill").config
    assert distill.accept_filter is False and distill.template == "{instruction}"
    assert distill.teacher == rec.header.model


def test_sd2_recipe_runs_from_a_gguf(tiny_gguf, tmp_path):
    pytest.importorskip("gguf")
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(12, seed=3))
    test = write_jsonl(tmp_path / "test.jsonl", make_rows(2, seed=4))
    overrides = [
        f"model={tiny_gguf}", f"output={tmp_path / 'run'}", "load.device=cpu",
        "stages.0.prune.layers=2", f"stages.0.prune.calib.path={data}", "stages.0.prune.calib.samples=4",
        "stages.0.prune.calib.seqlen=64",
        f"stages.1.distill.dataset={data}", "stages.1.distill.limit=8", "stages.1.distill.max_new_tokens=12",
        "stages.1.distill.max_length=96",
        f"stages.2.spec.prompts={test}", "stages.2.spec.limit=2", "stages.2.spec.max_new_tokens=10",
        "stages.2.spec.min_mal=1.0", f"stages.3.eval.ppl={test}", "stages.3.eval.ppl_seqlen=64",  # the shipped gate (1.9) is for the real model; a tiny random stand-in is below
    ]
    report = run(load_recipe("sd2-smollm2-135m", overrides=overrides))
    stages = {s["stage"]: s for s in report["stages"]}
    assert [s["stage"] for s in report["stages"]] == ["prune", "distill", "spec", "eval"]
    assert stages["eval"]["report"]["baseline"]["tasks"]["perplexity"]["perplexity"] > 0  # the target's own score
    assert all(s["status"] == "done" for s in report["stages"])
    assert stages["prune"]["report"]["layers_after"] == stages["prune"]["report"]["layers_before"] - 2
    regen = stages["distill"]["report"]["regenerate"]
    assert regen["acceptance_rate"] == 1.0  # accept_filter off: every non-empty answer of the teacher is kept
    assert 1.0 <= stages["spec"]["report"]["mal"] <= 5.0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest
