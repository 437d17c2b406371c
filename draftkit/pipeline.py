"""Run a recipe: stages in order, one output folder and a manifest entry per stage, resume, report.

Layout of a run directory::

    OUTPUT/
      recipe.yaml          the resolved recipe (overrides and interpolation applied)
      manifest.json        per stage: config hash, input hash, status, time, metrics
      00-prune/ 01-sparsify/ ...   each stage's output with its draftkit.json provenance
      report.json report.md plots/*.png

Re-running the same recipe skips stages whose config and input are unchanged and whose output
exists (resume after a crash or a kill); ``from_stage`` forces a restart from a stage. A failed stage
leaves earlier stages' outputs intact. Each stage runs as its command does (:func:`draftkit.stages.run_stage_on`:
streaming rule, memory estimate, lock). A model flows to the next stage in memory only while it fits
comfortably (:func:`draftkit.memory.fits_comfortably`); otherwise, and after a skipped stage, the next
stage reads the saved output.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from draftkit import console
from draftkit.atomic import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    config_paths,
    is_draftkit_output,
)
from draftkit.branches import input_identity, step_inputs
from draftkit.errors import DraftkitError, GateFailedError, InvalidInputError, OutputExistsError
from draftkit.fingerprint import decide, stage_fingerprint
from draftkit.gates import rejudge_stored, run_verdict
from draftkit.lock import LOCK_FILE, folder_lock
from draftkit.memory import collect_released_models, fits_comfortably
from draftkit.oserrors import user_error
from draftkit.recipe import Recipe
from draftkit.refs import resolve_model_ref
from draftkit.report import write_error_report
from draftkit.stages import Held, raise_if_gate_failed, run_stage_on, stages
from draftkit.threads import apply_threads

MANIFEST = "manifest.json"


def _read_manifest(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return {"stages": {}}


def _start_index(recipe: Recipe, from_stage: str | None) -> int | None:
    if from_stage is None:
        return None
    for step in recipe.steps:
        if from_stage in (step.name, str(step.index), step.dirname):
            return step.index
    names = ", ".join(f"{s.index}:{s.name}" for s in recipe.steps)
    raise InvalidInputError(f"--from {from_stage!r} names no stage of this recipe; stages: {names}")


def run(recipe: Recipe, *, from_stage: str | None = None, dry_run: bool = False,
        compare: list[str] | None = None) -> dict[str, Any]:
    """Run every stage of ``recipe``; returns the run report (also written as report.json/report.md).

    Before anything is written, the output folder is checked and every stage's checks run
    (:func:`draftkit.preflight.preflight`): a recipe that would fail at its last stage fails now, listing
    every problem. With ``dry_run`` nothing runs or is written: the plan is returned (see :func:`plan`).
    ``compare``: earlier runs (folders or report.json, oldest first) to compare with (:mod:`draftkit.compare`).

    Raises:
        PreflightError: the recipe would fail (every problem listed; nothing written).
        GateFailedError: a quality gate failed (all stages still ran and the report is written).
        DraftkitError: a stage failed; earlier outputs and the manifest are kept.
    """
    from draftkit.compare import load_previous
    from draftkit.preflight import check_recipe

    earlier = load_previous(compare or [])  # a wrong --compare fails before anything runs
    out = check_run_output(recipe)
    force_from = _start_index(recipe, from_stage)
    resolve_model_ref(recipe.header.model)  # a missing model fails before anything is written
    check_recipe(recipe)
    if dry_run:
        return plan(recipe, from_stage=from_stage)
    return _run(recipe, out, force_from, fresh=not out.exists(), earlier=earlier)


def _decide(step, stage_dir: Path, prev: dict[str, Any], fp: str, parts: dict[str, Any], forced: bool) -> tuple[bool, str]:
    """(reuse the saved output?, why) for one stage."""
    return decide(stage_dir, prev, fp, parts, forced)


def plan(recipe: Recipe, *, from_stage: str | None = None) -> dict[str, Any]:
    """What ``run`` would do, without doing it: each stage, run or skip and why, estimated time and memory."""
    from draftkit.estimates import human_bytes, stage_estimates

    out = Path(recipe.header.output)
    force_from = _start_index(recipe, from_stage)
    entries = _read_manifest(out).get("stages", {}) if out.is_dir() else {}
    registry = stages()
    load = recipe.header.load.model_dump(mode="json")
    estimates = stage_estimates(recipe)
    current, previous = recipe.header.model, None
    rewritten: set[str] = set()  # output folders of model-making stages that will run again
    fps: dict[int, str] = {}
    rows = []
    for step in recipe.steps:
        stage_dir = out / step.dirname
        prev = entries.get(str(step.index), {})
        reads, refs = step_inputs(recipe, step, out, current)
        upstream = any(r in rewritten for r in reads)
        input_id = input_identity(reads) if not upstream else f"output of a stage that reruns: {' + '.join(reads)}"
        fp, parts = stage_fingerprint(stage=step.name, config=step.config.model_dump(mode="json"), load=load,
                                      input_id=input_id, previous="+".join(fps[s.index] for s in refs) if refs else previous)
        forced = force_from is not None and step.index >= force_from
        reuse, why = _decide(step, stage_dir, prev, fp, parts, forced)
        if upstream and reuse:
            reuse, why = False, "an earlier stage reruns"
        est = estimates[step.index]
        rows.append({"index": step.index, "stage": step.name, "dir": str(stage_dir), "reads": reads,
                     "action": "skip" if reuse else "run", "why": why,
                     "estimated_seconds": None if reuse else prev.get("seconds"),
                     "estimated_memory_bytes": est["memory_bytes"],
                     "estimated_memory": human_bytes(est["memory_bytes"])})
        if not reuse and registry[step.name].makes_model:
            rewritten.add(str(stage_dir))
        previous = fps[step.index] = fp
        if registry[step.name].makes_model:
            current = str(stage_dir)
    return {"recipe": recipe.name, "output": str(out), "dry_run": True, "stages": rows}


def _run(recipe: Recipe, out: Path, force_from: int | None, *, fresh: bool,
         earlier: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    threads = apply_threads(recipe.header.load.threads)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "run"):  # a LockedError (another run holds the folder) leaves it alone
        try:
            return _run_locked(recipe, out, force_from, threads, earlier or [])
        except InvalidInputError:
            # bad input before any stage started, in a folder this run made: nothing of value, nothing left
            # behind. Once a stage started (its rows, checkpoints, .work folders) everything is kept.
            if fresh and not _read_manifest(out)["stages"] and not any(out.glob("*.work")):
                shutil.rmtree(out, ignore_errors=True)
            raise


def check_run_output(recipe: Recipe) -> Path:
    """A run writes into its own folder: new, empty, or an earlier run of draftkit (resumed). Never one that
    holds the user's other files, the input model or data, nor ``.``, ``~`` or a root."""
    out = Path(recipe.header.output)
    inputs = [recipe.header.model, *(p for step in recipe.steps for p in config_paths(step.config))]
    if out.is_dir() and not is_draftkit_output(out) and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise OutputExistsError(
            f"output {out} holds files draftkit did not write (no {MANIFEST} in it): a run writes into a folder "
            "of its own; set another output (--set output=DIR)"
        )
    return check_output_dir(out, overwrite=True, inputs=inputs)


def _run_locked(recipe: Recipe, out: Path, force_from: int | None, threads: int,
                earlier: list[dict[str, Any]]) -> dict[str, Any]:
    console.info(f"[dim]{threads} CPU thread(s) for torch (load.threads, --threads or DRAFTKIT_THREADS to change)[/dim]")
    for stale in out.glob(".*.tmp-*"):  # left by a killed run; never a finished output
        shutil.rmtree(stale, ignore_errors=True)
    manifest = _read_manifest(out)
    manifest.update(recipe=recipe.name, source=recipe.source)
    atomic_write_json(out / MANIFEST, manifest)  # marks the folder as draftkit's from the start
    atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
    entries: dict[str, Any] = manifest.setdefault("stages", {})
    registry = stages()
    load = recipe.header.load

    current = recipe.header.model  # path or id of the model the next stage reads
    held: Held | None = None  # the last output, still in memory while it fits comfortably
    results: list[dict[str, Any]] = []
    gate_failures: list[str] = []
    t_run = time.perf_counter()

    previous: str | None = None
    fps: dict[int, str] = {}
    load_json = load.model_dump(mode="json")
    for step in recipe.steps:
        stage = registry[step.name]
        stage_dir = out / step.dirname
        key = str(step.index)
        reads, refs = step_inputs(recipe, step, out, current)  # a merge's models, a from: stage's output, or current
        models = reads if stage.reads == "models" else None
        input_hash = input_identity(reads)
        fp, parts = stage_fingerprint(stage=step.name, config=step.config.model_dump(mode="json"), load=load_json,
                                      input_id=input_hash,
                                      previous="+".join(fps[s.index] for s in refs) if refs else previous)
        previous = fps[step.index] = fp
        prev = entries.get(key, {})
        forced = force_from is not None and step.index >= force_from
        reusable, why = _decide(step, stage_dir, prev, fp, parts, forced)
        reusable = reusable and prev.get("stage") == step.name
        if reusable:
            console.info(f"[dim]{step.dirname}: unchanged, skipped (output {stage_dir})[/dim]")
            # thresholds are not in the fingerprint: today's gates judge the stored metrics again
            report = rejudge_stored(step.name, step.config, prev.get("report", {}), stage_dir)
            status = "gate_failed" if report.get("passed") is False else "done"
            if status != prev["status"]:
                entries[key].update(status=status, report=report)
                atomic_write_json(out / MANIFEST, manifest)
            results.append({"stage": step.name, "dir": str(stage_dir), "reads": reads if refs else None, "status": status,
                            "skipped": True, "seconds": prev.get("seconds"), "report": report})
            if status == "gate_failed":
                gate_failures.append(f"{step.dirname}: {report.get('gate', {}).get('message', 'gate failed')}")
            if stage.save is None:
                current, held = str(stage_dir), None
            continue

        console.info(f"[bold]{step.dirname}[/bold]: running {step.name} ({why})")
        entries[key] = {"stage": step.name, "config_hash": step.config_hash(), "input_hash": input_hash,
                        "fingerprint": fp, "parts": parts, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(out / MANIFEST, manifest)
        t0 = time.perf_counter()
        try:
            cfg = _with_run_defaults(step.config, stage_dir, step.config_hash())
            if models is not None:  # merge: reads its models from their checkpoints
                held = None
                report = stage.run(models, cfg, out=stage_dir, load=load, overwrite=True,
                                   arguments={"recipe": recipe.name, "step": step.index})
            else:
                given, held = held if held is not None and held.path == reads[0] else None, None
                ran = run_stage_on(step.name, reads[0], cfg, out=stage_dir, load=load, overwrite=True, held=given,
                                   arguments={"recipe": recipe.name, "step": step.index}, lock_what=f"run ({step.dirname})")
                report = ran.report
                if fits_comfortably(ran.model):  # a stage that writes no model (eval, export) hands on its input
                    held = Held(ran.model, ran.tokenizer, str(stage_dir) if stage.save is None else reads[0])
                del given, ran
                if held is None:  # the stage's model, now unreferenced: freed before the next stage loads
                    collect_released_models()
        except BaseException as exc:
            entries[key].update(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", seconds=round(time.perf_counter() - t0, 3),
                                error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            atomic_write_json(out / MANIFEST, manifest)
            machine = user_error(exc) if isinstance(exc, Exception) and not isinstance(exc, DraftkitError) else None
            write_error_report(out, {"recipe": recipe.name, "model": recipe.header.model, "output": str(out),
                                     "failed_stage": step.dirname, "stages": results}, machine or exc)
            if machine is not None:  # the user's machine (a full disk...): exit 2 in the report too
                machine.args = (f"{step.dirname}: {machine}",)
                raise machine from exc
            if isinstance(exc, DraftkitError):  # the same error (its type and attributes), its place in front
                exc.args = (f"{step.dirname}: {exc}", *exc.args[1:])
            raise
        seconds = round(time.perf_counter() - t0, 3)
        status = "done"
        try:
            raise_if_gate_failed(report)
        except GateFailedError as exc:
            status = "gate_failed"
            gate_failures.append(f"{step.dirname}: {exc}")
        entries[key].update(status=status, seconds=seconds, report=report)
        atomic_write_json(out / MANIFEST, manifest)
        results.append({"stage": step.name, "dir": str(stage_dir), "reads": reads if refs else None, "status": status, "skipped": False,
                        "seconds": seconds, "report": report})
        if stage.save is None:  # the stage produced the model the next stage reads
            current = str(stage_dir)

    from draftkit.report import write_run_report

    passed, gates = run_verdict(results)
    run_report = {
        "passed": passed and not gate_failures,
        "recipe": recipe.name,
        "model": recipe.header.model,
        "output": str(out),
        "final_model": current,
        "seconds": round(time.perf_counter() - t_run, 3),
        "threads": threads,
        "gate_failures": gate_failures,
        "gates": gates,
        "stages": results,
    }
    from draftkit.compare import apply as compare_runs

    compare_runs(run_report, earlier, [step.config for step in recipe.steps])  # night over night, relative gates
    if recipe.header.keep == "final":
        from draftkit.reuse import keep_final

        keep_final(run_report, out, {name for name, st in registry.items() if st.save is None})
    write_run_report(run_report, out)
    if gate_failures:
        err = GateFailedError("; ".join(gate_failures))
        err.report = run_report  # type: ignore[attr-defined]
        raise err
    return run_report


def _with_run_defaults(cfg, stage_dir: Path, config_hash: str):
    """Point a stage's working directory (resumable intermediate files, e.g. regenerated rows) beside its
    output, keyed by the stage's config: a rerun after a kill resumes there, a changed config starts afresh
    (the other configs' folders are removed)."""
    if "work_dir" in type(cfg).model_fields and getattr(cfg, "work_dir", None) is None:
        root = stage_dir.with_name(stage_dir.name + ".work")
        if root.is_dir():
            for old in root.iterdir():
                if old.name != config_hash:
                    shutil.rmtree(old, ignore_errors=True)
        return cfg.model_copy(update={"work_dir": str(root / config_hash)})
    return cfg
