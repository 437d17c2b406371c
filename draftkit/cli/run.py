"""``draftkit run`` and ``draftkit recipes``: YAML recipes that chain the stages."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from draftkit import console
from draftkit.cli._common import JsonOpt, QuietOpt, emit, handle_errors
from draftkit.errors import GateFailedError

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a recipe field: KEY.PATH=VALUE, e.g. stages.1.sparsify.sparsity=0.7 or model=PATH"),
]


@handle_errors
def run(
    recipe: Annotated[str, typer.Argument(help="recipe file, or the name of a shipped recipe")] = "demo",
    set_: SetOpt = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="rerun from this stage (name, index or NN-name)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check everything and print the plan (each stage: run or "
                                          "skip and why, estimated time and memory); run nothing, write nothing")] = False,
    compare: Annotated[list[str] | None, typer.Option(
        "--compare", help="an earlier run of the recipe (its folder or report.json) to compare with: the target's own "
        "scores apart from the draft's, so a regression is attributed; max_regression gates; repeat for a history, "
        "oldest first")] = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe's stages in order, resuming where a previous run stopped.

    Before any stage works, every stage's checks run (models, data, settings, memory): a recipe that
    would fail fails in seconds, listing every problem, and writes nothing. One run at a time per output
    folder (a lock names the PID holding it). A stage is skipped only when nothing it depends on changed.

    Examples:

      draftkit run                                    (the shipped demo recipe)

      draftkit run recipes/llama-3.1-8b-prune6-sdd.yaml --set model=/ckpt/nightly

      draftkit run my.yaml --set stages.1.sparsify.sparsity=0.7 --from sparsify

      draftkit run my.yaml --set model=/ckpt/tonight --set output=runs/tonight --compare runs/last-night

    Exit codes: 0 success, 2 invalid input, 3 a quality gate failed, 1 internal error, 130 interrupted (Ctrl-C),
    143 terminated (SIGTERM); after 130 or 143 the next run resumes.
    """
    from draftkit.pipeline import run as run_pipeline
    from draftkit.recipe import load_recipe
    from draftkit.report import render

    console.set_quiet(quiet)
    rec = load_recipe(recipe, overrides=set_ or [])
    if dry_run:
        emit(run_pipeline(rec, from_stage=from_stage, dry_run=True), json, _render_plan)
        return
    try:
        report = run_pipeline(rec, from_stage=from_stage, compare=compare)
    except GateFailedError as exc:
        emit(exc.report, json, render)  # type: ignore[attr-defined]
        raise
    emit(report, json, render)


def _render_plan(plan: dict) -> None:
    t = Table("stage", "action", "why", "est. time", "est. memory", title=f"plan for {plan['output']}")
    for r in plan["stages"]:
        secs = r["estimated_seconds"]
        t.add_row(f"{r['index']:02d}-{r['stage']}", r["action"], r["why"],
                  "-" if r["action"] == "skip" else (f"{secs:.0f}s (last run)" if secs else "unknown"),
                  r["estimated_memory"])
    console.out.print(t)


recipes_app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True)


@recipes_app.command("list")
@handle_errors
def list_(json: JsonOpt = False) -> None:
    """List the shipped recipes."""
    from draftkit.recipe import load_recipe, shipped_recipes

    data = {}
    for name, path in shipped_recipes().items():
        try:
            desc = load_recipe(str(path)).header.description or ""
        except Exception as exc:  # noqa: BLE001
            desc = f"(invalid: {exc})"
        data[name] = {"path": str(path), "description": desc}

    def render(d):
        t = Table("name", "description", "path")
        for k, v in d.items():
            t.add_row(k, v["description"], v["path"])
        console.out.print(t)

    emit(data, json, render)


@recipes_app.command("show")
@handle_errors
def show(name: Annotated[str, typer.Argument(help="recipe name or file")], set_: SetOpt = None) -> None:
    """Print a recipe as it will run (overrides and interpolation applied)."""
    from draftkit.recipe import load_recipe

    print(load_recipe(name, overrides=set_ or []).to_yaml(), end="")


@recipes_app.command("validate")
@handle_errors
def validate(file: Annotated[str, typer.Argument(help="recipe file or name")], set_: SetOpt = None,
             portable: Annotated[bool, typer.Option("--portable", help="check the recipe alone, not this machine "
                                                    "(GPU, installed extras, memory): for a recipe meant elsewhere")] = False,
             json: JsonOpt = False) -> None:
    """Check a recipe without running it, with the same checks `draftkit run` makes first: YAML, keys, types,
    stage and method names, interpolation; models, teachers, targets and baselines resolve; data and prompts
    exist with usable columns; tokenizers, settings that go together, memory. Every problem, one line each."""
    from draftkit.pipeline import check_run_output
    from draftkit.preflight import check_recipe
    from draftkit.recipe import load_recipe

    rec = load_recipe(file, overrides=set_ or [])
    check_run_output(rec)
    check_recipe(rec, environment=not portable)
    data = {"valid": True, "name": rec.name, "stages": [s.name for s in rec.steps]}
    emit(data, json, lambda d: console.out.print(f"{file}: valid ({len(rec.steps)} stages: {', '.join(d['stages'])})"))
