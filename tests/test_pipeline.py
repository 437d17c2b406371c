"""Recipes and the pipeline on tiny models: resume, --from, failures, kills, overrides, bad input."""

import json
import os

import pytest
import yaml
from typer.testing import CliRunner

import draftkit.engine.placement
import draftkit.prune
from draftkit.cli import app
from draftkit.errors import EXIT_INVALID_INPUT, DataError
from draftkit.pipeline import run
from draftkit.recipe import RecipeError, load_recipe, parse_recipe

runner = CliRunner()


def write_recipe(tmp_path, model, calib, stages=None, name="r.yaml"):
    data = {
        "name": "t",
        "model": str(model),
        "output": str(tmp_path / "run"),
        "stages": stages
        or [
            {"prune": {"layers": 1, "calib": {"path": str(calib), "samples": 4, "seqlen": 32}}},
            {"prune": {"drop": "0"}},
        ],
    }
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_run_resume_and_rerun_changed(tiny_llama, calib_file, tmp_path):
    rec = write_recipe(tmp_path, tiny_llama, calib_file)
    report = run(load_recipe(str(rec)))
    assert [s["status"] for s in report["stages"]] == ["done", "done"]
    out = tmp_path / "run"
    assert json.loads((out / "01-prune" / "config.json").read_text())["num_hidden_layers"] == 4
    assert (out / "report.md").is_file() and (out / "recipe.yaml").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["0"]["status"] == "done" and manifest["stages"]["0"]["config_hash"]

    again = run(load_recipe(str(rec)))
    assert [s["skipped"] for s in again["stages"]] == [True, True]

    # change the second stage only: the first is skipped, the second reruns
    changed = run(load_recipe(str(rec), overrides=["stages.1.prune.drop=1"]))
    assert [s["skipped"] for s in changed["stages"]] == [True, False]
    prov = json.loads((out / "01-prune" / "draftkit.json").read_text())
    assert prov["facts"]["dropped_layers"] == [1]

    forced = run(load_recipe(str(rec), overrides=["stages.1.prune.drop=1"]), from_stage="0")
    assert [s["skipped"] for s in forced["stages"]] == [False, False]


def test_failed_stage_keeps_earlier_outputs(tiny_llama, calib_file, tmp_path, monkeypatch):
    rec = write_recipe(tmp_path, tiny_llama, calib_file)
    out = tmp_path / "run"
    calls = {"n": 0}
    real = draftkit.prune.prune_model

    def flaky(real_fn):
        def run_it(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # Ctrl-C in the middle of stage 1
            return real_fn(*args, **kwargs)
        return run_it

    # stage 1 (prune --drop) streams by the command's rule, stage 0 runs resident: interrupt either path
    monkeypatch.setattr(draftkit.prune, "prune_model", flaky(real))
    monkeypatch.setattr(draftkit.engine.placement, "write_streamed", flaky(draftkit.engine.placement.write_streamed))
    with pytest.raises(KeyboardInterrupt):
        run(load_recipe(str(rec)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["0"]["status"] == "done"
    assert manifest["stages"]["1"]["status"] == "interrupted"  # Ctrl-C is not a failure of the stage
    assert (out / "00-prune" / "model.safetensors").is_file()
    assert not (out / "01-prune").exists()
    mtime = os.path.getmtime(out / "00-prune" / "model.safetensors")

    monkeypatch.undo()
    report = run(load_recipe(str(rec)))
    assert [s["skipped"] for s in report["stages"]] == [True, False]
    assert os.path.getmtime(out / "00-prune" / "model.safetensors") == mtime


def test_killed_stage_is_rerun_cleanly(tiny_llama, calib_file, tmp_path):
    rec = write_recipe(tmp_path, tiny_llama, calib_file)
    out = tmp_path / "run"
    run(load_recipe(str(rec)))
    # what a SIGKILL during stage 1 leaves: a half-written temporary dir and a 'running' entry
    (out / "01-prune").rename(out / ".01-prune.tmp-dead")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["1"]["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = run(load_recipe(str(rec)))
    assert [s["skipped"] for s in report["stages"]] == [True, False]
    assert not list(out.glob(".*.tmp-*"))
    assert json.loads((out / "01-prune" / "config.json").read_text())["num_hidden_layers"] == 4


def test_overrides_and_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTLY_CKPT", "/ckpt/nightly-42")
    text = """
name: demo
model: ${env:NIGHTLY_CKPT}
output: runs/${name}
stages:
  - prune: {layers: 2, calib: {path: data.jsonl}}
  - prune: {layers: "${stages.0.prune.layers}"}
"""
    r = parse_recipe(text, overrides=["stages.0.prune.calib.samples=16", "output=elsewhere"])
    assert r.header.model == "/ckpt/nightly-42"
    assert r.header.output == "elsewhere"
    assert r.steps[0].config.calib.samples == 16
    assert r.steps[1].config.layers == 2
    assert yaml.safe_load(r.to_yaml())["model"] == "/ckpt/nightly-42"
    r2 = parse_recipe(text, overrides=["model=/other"])
    assert r2.header.model == "/other"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("name: t\nmodel: m\noutput: o\nstages:\n  - prune: {layers: 2, foo: 1}\n", "r.yaml:5:24: stages[0].prune.foo: unknown key 'foo'; allowed: layers"),
        ("name: t\nmodel: m\noutput: o\nstages:\n  - prunex: {layers: 2}\n", "unknown stage 'prunex'"),
        ("name: t\nmodel: m\noutput: o\nstages:\n  - prune: {layers: 2, method: nope}\n", "stages[0].prune.method"),
        ("name: t\nmodel: m\noutput: o\nstages:\n  - prune: {layers: two}\n", "r.yaml:5:13: stages[0].prune.layers"),
        ("name: t\nmodel: [\noutput: o\n", "r.yaml:4:1: YAML syntax error"),
        ("name: t\nmodel: m\noutput: ${nothing}\nstages:\n  - prune: {layers: 2}\n", "${nothing} names nothing"),
        ("name: t\nmodel: ${env:DRAFTKIT_SURELY_UNSET}\noutput: o\nstages:\n  - prune: {layers: 2}\n", "DRAFTKIT_SURELY_UNSET is not set"),
        ("name: t\nmodel: m\noutput: o\nstagez: []\n", "unknown key 'stagez'"),
    ],
)
def test_bad_recipes_name_the_place(text, needle):
    with pytest.raises(RecipeError) as exc:
        parse_recipe(text, filename="r.yaml")
    assert needle in str(exc.value)


def test_bad_override():
    with pytest.raises(RecipeError, match="index 5"):
        parse_recipe("name: t\nmodel: m\noutput: o\nstages:\n  - prune: {layers: 2}\n", overrides=["stages.5.prune.layers=1"])
    with pytest.raises(RecipeError, match="KEY.PATH=VALUE"):
        parse_recipe("name: t\nmodel: m\noutput: o\nstages:\n  - prune: {layers: 2}\n", overrides=["model"])


def test_cli_run_bad_input_one_line_and_nothing_written(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: t\nmodel: m\noutput: {tmp_path / 'run'}\nstages:\n  - prune: {{layers: 2, colour: red}}\n")
    r = runner.invoke(app, ["run", str(bad)])
    assert r.exit_code == EXIT_INVALID_INPUT
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "colour" in lines[0] and "bad.yaml:5" in lines[0]
    assert not (tmp_path / "run").exists()
    r = runner.invoke(app, ["recipes", "validate", str(bad)])
    assert r.exit_code == EXIT_INVALID_INPUT
    r = runner.invoke(app, ["run", "no-such-recipe"])
    assert r.exit_code == EXIT_INVALID_INPUT and "shipped recipes" in r.stderr


def test_cli_run_json_and_from(tiny_llama, calib_file, tmp_path):
    rec = write_recipe(tmp_path, tiny_llama, calib_file)
    r = runner.invoke(app, ["run", str(rec), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["final_model"].endswith("01-prune") and len(rep["stages"]) == 2
    r = runner.invoke(app, ["run", str(rec), "--from", "nope"])
    assert r.exit_code == EXIT_INVALID_INPUT and "names no stage" in r.stderr


# ---- the recipe as one typed model (#10 item 2) -------------------------------------------------


def test_recipe_is_one_typed_model():
    from draftkit.prune import PruneConfig
    from draftkit.recipe import recipe_model
    from draftkit.sparsify import SparsifyConfig

    schema = recipe_model().model_json_schema()
    members = schema["properties"]["stages"]["items"]["oneOf"]
    assert {m["$ref"].rsplit("/", 1)[1] for m in members} >= {"PruneStep", "SparsifyStep", "DistillStep", "ExportStep",
                                                              "EvalStep", "SpecStep"}
    r = parse_recipe("name: t\nmodel: m\noutput: o\nload: {dtype: float32}\nstages:\n"
                     "  - prune: {layers: 2}\n  - sparsify: {sparsity: 0.5, method: magnitude}\n")
    assert isinstance(r.header, recipe_model())
    assert isinstance(r.steps[0].config, PruneConfig) and isinstance(r.steps[1].config, SparsifyConfig)
    assert r.header.stages[1].sparsify is r.steps[1].config
    # execution options live apart from what the stages compute
    assert r.execution.dtype == "float32"
    again = parse_recipe("name: t\nmodel: m\noutput: o\nload: {dtype: bfloat16}\nstages:\n"
                         "  - prune: {layers: 2}\n  - sparsify: {sparsity: 0.5, method: magnitude}\n")
    assert [s.config_hash() for s in r.steps] == [s.config_hash() for s in again.steps]


def test_recipe_lists_every_problem_with_its_place():
    text = "name: t\nmodel: m\noutput: o\nstages:\n  - prune: {layers: 2, foo: 1}\n  - sparsify: {sparsity: 1.5}\n  - 3\n"
    with pytest.raises(RecipeError) as exc:
        parse_recipe(text, filename="r.yaml")
    lines = str(exc.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("r.yaml:5:24: stages[0].prune.foo: unknown key 'foo'")
    assert lines[1].startswith("r.yaml:6:16: stages[1].sparsify.sparsity:")
    assert lines[2].startswith("r.yaml:7:5: stages[2]: each stage is a one-key mapping")


@pytest.mark.parametrize("override, needle", [
    ("stages.0.prune.layerz=2", "--set stages.0.prune.layerz=2: stages[0].prune.layerz: unknown key 'layerz'"),
    ("stages.0.sparsify.sparsity=0.5", "stage 0 is prune, not sparsify"),
    ("load.dtype=float33", "--set load.dtype=float33: load.dtype:"),
    ("stages.0.prune.layers=-1", "--set stages.0.prune.layers=-1: stages[0].prune.layers:"),
])
def test_set_is_validated_against_the_model(override, needle):
    with pytest.raises(RecipeError) as exc:
        parse_recipe("name: t\nmodel: m\noutput: o\nstages:\n  - prune: {layers: 2}\n", filename="r.yaml",
                     overrides=[override])
    assert needle in str(exc.value)


def test_failed_new_run_keeps_what_a_stage_wrote(tiny_llama, calib_file, tmp_path, monkeypatch):
    """Bad input raised by a stage that started (e.g. distill's acceptance check after hours of regenerated rows
    in OUT/00-distill.work) leaves the new output folder, its .work folder and manifest in place."""
    rec = write_recipe(tmp_path, tiny_llama, calib_file)
    out = tmp_path / "run"

    def slow_then_bad(model, tok, cfg):
        rows = out / "00-prune.work" / "rows.jsonl"
        rows.parent.mkdir(parents=True)
        rows.write_text("{}\n")
        raise DataError(f"none accepted; the rows are kept in {rows}")

    monkeypatch.setattr(draftkit.prune, "prune_model", slow_then_bad)
    with pytest.raises(DataError, match="rows are kept"):
        run(load_recipe(str(rec)))
    assert (out / "00-prune.work" / "rows.jsonl").read_text() == "{}\n"
    assert json.loads((out / "manifest.json").read_text())["stages"]["0"]["status"] == "failed"


def test_locked_new_run_never_deletes_the_other_run(tiny_llama, calib_file, tmp_path, monkeypatch):
    """Two runs on a new output both see it new; the one refused by the lock leaves the winner's folder alone."""
    import contextlib

    import draftkit.pipeline as pipeline
    from draftkit.errors import LockedError

    rec = write_recipe(tmp_path, tiny_llama, calib_file)
    out = tmp_path / "run"

    @contextlib.contextmanager
    def won_by_another(folder, what="run"):
        (out / "00-prune").mkdir(parents=True)  # the other process's live run, started in between
        (out / "00-prune" / "model.safetensors").write_text("live")
        raise LockedError(f"{folder} is in use by another draftkit run")
        yield

    monkeypatch.setattr(pipeline, "folder_lock", won_by_another)
    with pytest.raises(LockedError):
        run(load_recipe(str(rec)))
    assert (out / "00-prune" / "model.safetensors").read_text() == "live"
