"""What a search leaves behind: the drafts, report.json, the plot and the best candidate as a recipe."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from draftkit.atomic import atomic_dir, atomic_write_json, atomic_write_text
from draftkit.provenance import PROVENANCE_FILE
from draftkit.search.config import SearchConfig
from draftkit.search.grid import heal_config, prune_config, sparsify_config

BEST_RECIPE = "best.yaml"
PLOT = "search.png"


def _absolute(value: Any) -> Any:
    """A local path made absolute (the recipe runs from anywhere); anything else as it is."""
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def _stage(config, **absolute_fields: bool) -> dict[str, Any]:
    data = config.model_dump(mode="json", exclude_defaults=True, exclude={"work_dir"})
    for key in ("dataset", "teacher", "target", "prompts"):
        if key in data:
            data[key] = _absolute(data[key])
    if isinstance(data.get("calib"), dict) and "path" in data["calib"]:
        data["calib"]["path"] = _absolute(data["calib"]["path"])
    if "template" in data:
        from draftkit.distill.templates import resolve_template

        named = [n for n in ("instruction-only", "default") if resolve_template(n) == data["template"]]
        data["template"] = named[0] if named else data["template"]
    return data


def _entry(config) -> dict[str, Any]:
    """A recipe entry ``{stage: settings}`` for a stage's config, under the name its stage is registered by."""
    from draftkit.registry import stages

    return {next(n for n, s in stages().items() if s.config is type(config)): _stage(config)}


def best_recipe(report: dict[str, Any], cfg: SearchConfig, out: Path) -> dict[str, Any] | None:
    """The recipe that rebuilds the best candidate from its source and measures it with ``spec`` (the same prompts,
    k and tokens): ``draftkit run`` reproduces its MAL."""
    from draftkit.evaluate.spec import SpecConfig

    best = next((r for r in report["candidates"] if r["name"] == report.get("best")), None)
    if best is None:
        return None
    target = _absolute(report["target"])
    stages: list[dict[str, Any]] = []
    if best["drop"]:
        stages.append(_entry(prune_config(cfg, best["drop"])))
    if best["sparsity"] != "0":
        stages.append(_entry(sparsify_config(cfg, best["sparsity"])))
    if best["healing"] != "none":
        stages.append(_entry(heal_config(cfg, best["healing"], best["seed"], target=target, rows=None)))
    spec = SpecConfig(target=target, prompts=cfg.prompts, limit=cfg.prompt_limit, k=cfg.k,
                      max_new_tokens=cfg.max_new_tokens, chat=cfg.chat, check_lossless=False)
    stages.append(_entry(spec))
    load = report.get("load") or {}
    return {
        "name": f"search-best-{best['name']}",
        "description": f"the best draft of a search for {report['target']} (predicted speedup "
                       f"{best['predicted_speedup']:.2f}x at k={best['best_k']}); `draftkit run` rebuilds and measures it",
        "model": _absolute(best["base"]) if best["base"] else target,
        "output": str(Path(out).resolve() / "best-run"),
        "load": {k: v for k, v in {"dtype": load.get("dtype"), "compute": load.get("compute"),
                                    "device": load.get("device")}.items() if v},
        "stages": stages,
    }


def write_search(model, tokenizer, out: Path, provenance: dict[str, Any], cfg: SearchConfig, overwrite: bool) -> dict[str, Any]:
    """The search stage's writer: drafts (every candidate's, or the frontier's with ``keep: frontier``) moved out of
    the work folder into ``out/drafts``, ``report.json``, ``search.png`` and ``best.yaml``."""
    report = provenance["facts"]
    work = Path(report["work_dir"])
    out = Path(out)
    extra: dict[str, Any] = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for r in report["candidates"]:
            if not r["steps"]:
                continue  # the target or another base as it is: not copied
            if cfg.keep == "all" or r["frontier"]:
                (tmp / "drafts").mkdir(exist_ok=True)
                shutil.move(r["draft"], tmp / "drafts" / r["name"])
                r["draft"] = str(out / "drafts" / r["name"])
            else:
                r["draft"] = None
        recipe = best_recipe(report, cfg, out)
        if recipe is not None:
            atomic_write_text(tmp / BEST_RECIPE, yaml.safe_dump(recipe, sort_keys=False))
            extra["best_recipe"] = str(out / BEST_RECIPE)
        try:
            from draftkit.plots import plot_search

            plot_search(report, tmp / PLOT)
            extra["plot"] = str(out / PLOT)
        except Exception as exc:  # noqa: BLE001 - matplotlib is an optional extra: the search stands without its plot
            from draftkit import console

            console.warn(f"no plot: {exc}")
        report.update(extra)
        atomic_write_json(tmp / "report.json", {"provenance": provenance, "report": report})
        atomic_write_json(tmp / PROVENANCE_FILE, provenance)
    shutil.rmtree(work / "steps", ignore_errors=True)  # what was not kept: intermediate models
    shutil.rmtree(work / "train", ignore_errors=True)
    if report.get("work_is_temporary"):
        shutil.rmtree(work, ignore_errors=True)
    return {"candidates": report["candidates"], **extra}
