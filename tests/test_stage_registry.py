"""A stage is registered in one place (draftkit/registry.py): a toy stage registered there alone is parsed in
recipes, listed and run by the CLI, checked by preflight and its input checks, fingerprinted for resume, run by
``draftkit run`` and shown in the report; and no other module of draftkit branches on a stage's name."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

from draftkit import registry
from draftkit.cli._common import OUTPUT, ModelArg, Output, build, emit, handle_errors
from draftkit.cli._options import Fields, config_options
from draftkit.stages import LoadConfig, run_stage

ROOT = Path(__file__).resolve().parent.parent


class ToyConfig(BaseModel):
    """Scale the final norm by a factor."""

    model_config = ConfigDict(extra="forbid")

    factor: float = Field(2.0, gt=0, description="what the final norm's weight is multiplied by")
    notes: str | None = Field(None, description="a data file the toy stage reads (for its fingerprint)")


def toy_run(model, tokenizer, cfg: ToyConfig):
    from draftkit.modeling import final_norm

    with torch.no_grad():
        final_norm(model).weight.mul_(cfg.factor)
    return model, {"stage": "toy", "factor": cfg.factor, "scaled": "final norm"}


def toy_preflight(c, where, recipe, step, hf_config):
    if step.config.factor > 100:
        c.add(f"{where}.factor", "a factor above 100 breaks the model")


@handle_errors
@config_options(cfg=Fields(ToyConfig), load=Fields(LoadConfig), io=OUTPUT)
def toy_command(model: ModelArg, *, cfg: dict, load: dict, io: Output) -> None:
    """Scale the final norm (a stage registered by a test)."""
    report = run_stage("toy", model, build(ToyConfig, **cfg), out=io.output or Path("toy-out"),
                       load=build(LoadConfig, **load), overwrite=io.overwrite)
    emit(report, io.as_json)


TOY = registry.Stage("toy", config=ToyConfig, run=toy_run, command=toy_command,
                     help="Scale the final norm (a stage registered by a test).", references=(("notes", "data"),),
                     preflight=toy_preflight, metrics=("factor",), computes=False)


@pytest.fixture
def toy():
    with registry.registered(TOY) as entry:
        yield entry


def _recipe(tmp_path: Path, model: Path, notes: Path, factor: float = 2.0) -> Path:
    rec = tmp_path / f"toy-{factor}.yaml"
    rec.write_text(f"name: toy\nmodel: {model}\noutput: {tmp_path / 'run'}\nload: {{dtype: float32}}\n"
                   f"stages:\n  - toy: {{factor: {factor}, notes: {notes}}}\n")
    return rec


def test_a_stage_registered_once_is_parsed_run_resumed_and_reported(toy, tiny_llama, tmp_path):
    from draftkit.pipeline import plan, run
    from draftkit.preflight import PreflightError
    from draftkit.recipe import RecipeError, load_recipe

    notes = tmp_path / "notes.txt"
    notes.write_text("one")
    rec = _recipe(tmp_path, tiny_llama, notes)
    recipe = load_recipe(str(rec))  # the recipe union has the toy stage's config
    assert recipe.steps[0].name == "toy" and isinstance(recipe.steps[0].config, ToyConfig)
    with pytest.raises(RecipeError, match=r"stages\.0\.toy\.factr|stages\[0\]\.toy\.factr"):
        load_recipe(str(rec), overrides=["stages.0.toy.factr=3"])
    with pytest.raises(PreflightError, match=r"stages\[0\]\.toy\.factor: a factor above 100"):  # its preflight
        run(load_recipe(str(_recipe(tmp_path, tiny_llama, notes, factor=1000))))

    first = run(recipe)  # draftkit run
    out = tmp_path / "run"
    assert first["stages"][0]["report"]["factor"] == 2.0 and (out / "00-toy" / "model.safetensors").is_file()
    assert "factor" in (out / "report.md").read_text()  # its registered headline metric
    manifest = json.loads((out / "manifest.json").read_text())["stages"]["0"]
    assert "notes" in manifest["parts"]["references"]  # its data file is in the fingerprint
    again = run(load_recipe(str(rec)))
    assert again["stages"][0]["skipped"] is True  # resume: nothing changed
    notes.write_text("two")
    assert plan(load_recipe(str(rec)))["stages"][0]["why"] == "notes changed"  # --dry-run says why
    assert run(load_recipe(str(rec)))["stages"][0]["skipped"] is False


def test_a_registered_stage_has_a_command_and_input_checks(toy, tiny_llama, tmp_path):
    from draftkit.cli import app
    from draftkit.errors import DataError

    runner = CliRunner()
    listing = runner.invoke(app, ["--help"])
    assert "toy" in listing.output and "Scale the final norm" in listing.output
    helped = runner.invoke(app, ["toy", "--help"])
    assert helped.exit_code == 0 and "--factor" in helped.output and "--notes" in helped.output
    result = runner.invoke(app, ["toy", str(tiny_llama), "--factor", "3", "-o", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["factor"] == 3.0
    with pytest.raises(DataError, match="notes file .* does not exist"):  # a data reference checked as an input
        run_stage("toy", str(tiny_llama), ToyConfig(notes=str(tmp_path / "missing.txt")), out=tmp_path / "x")


def test_an_unregistered_stage_is_unknown_everywhere(tiny_llama, tmp_path):
    from draftkit.recipe import RecipeError, load_recipe

    notes = tmp_path / "notes.txt"
    notes.write_text("one")
    with pytest.raises(RecipeError, match="unknown stage 'toy'"):
        load_recipe(str(_recipe(tmp_path, tiny_llama, notes)))
    from draftkit.cli import commands

    assert "toy" not in commands()


# ------------------------------------------------------------------------------------------------ source scan


def _own_places(entry) -> set[Path]:
    """Where a stage may name itself: its own package (or module), from its config's, and its command's module."""
    places = set()
    config, command = entry._fields["config"], entry._fields["command"]
    if isinstance(config, str):
        top = ROOT.joinpath(*config.partition(":")[0].split(".")[:2])
        places.add(top if top.is_dir() else top.with_suffix(".py"))
    if isinstance(command, str):
        places.add(ROOT.joinpath(*command.partition(":")[0].split(".")).with_suffix(".py"))
    return places


def stage_name_branches(names: set[str], allowed: dict[str, set[Path]]) -> list[str]:
    """Every place in draftkit/ that branches on a stage's name: a comparison with it (``== "prune"``,
    ``in ("prune", "sparsify")``), a table keyed by it (``{"eval": ...}``) or a ``case "spec":``, outside
    draftkit/registry.py and the stage's own package and command module."""
    found = []
    for path in sorted((ROOT / "draftkit").rglob("*.py")):
        if path == ROOT / "draftkit" / "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            literals: list[ast.AST] = []
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    literals += side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            elif isinstance(node, ast.Dict):
                literals += [k for k in node.keys if k is not None]
            elif isinstance(node, ast.MatchValue):
                literals.append(node.value)
            for lit in literals:
                if isinstance(lit, ast.Constant) and lit.value in names:
                    if not any(path == p or p in path.parents for p in allowed[lit.value]):
                        found.append(f"{path.relative_to(ROOT)}:{getattr(lit, 'lineno', 0)}: {lit.value!r}")
    return found


def test_no_module_but_the_registry_branches_on_a_stage_name():
    stages = registry.stages()
    allowed = {name: _own_places(entry) for name, entry in stages.items()}
    found = stage_name_branches(set(stages), allowed)
    assert not found, "stage names outside draftkit/registry.py (register the behaviour with the stage):\n" + \
        "\n".join(found)


def test_the_scan_finds_a_stage_switch():
    """The scan is not vacuous: a switch on a stage name in a module of draftkit is found."""
    fake = ROOT / "draftkit" / "_scan_probe_tmp.py"
    fake.write_text('def f(name):\n    return 1 if name == "sparsify" else {"eval": 2}.get(name)\n')
    try:
        found = stage_name_branches({"sparsify", "eval"}, {"sparsify": set(), "eval": set()})
    finally:
        fake.unlink()
    assert [f.split(": ")[1] for f in found if "_scan_probe_tmp" in f] == ["'sparsify'", "'eval'"]
