"""The run report: report.json, report.md (a table of metrics per stage) and PNG plots."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from draftkit.atomic import atomic_write_json, atomic_write_text

_SKIP = {"passed", "gates", "gate", "output", "stage", "total_seconds", "seconds", "plot", "work_dir", "regenerate", "train", "serve", "threads",
         "compute"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in list(v.items())[:6])
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
    return str(v)


def stage_metrics(stage: str, report: dict[str, Any], limit: int = 6) -> dict[str, str]:
    """A few headline metrics of one stage's report, formatted for a table."""
    from draftkit.registry import stage as registered

    entry = registered(stage)  # the metrics worth a column, as the stage registers them; then any other scalar
    found = {k: v for k in (entry.metrics if entry is not None else ()) if (v := _lookup(report, k)) is not None}
    keys = list(found)
    for k, v in report.items():
        if len(keys) >= limit:
            break
        if k in keys or k in _SKIP or isinstance(v, (dict, list)) and len(str(v)) > 120:
            continue
        if isinstance(v, (int, float, str, bool)) or (isinstance(v, (list, dict)) and len(v) <= 8):
            keys.append(k)
    return {k: _fmt(found[k] if k in found else report[k]) for k in keys[:limit]}


def _lookup(report: dict[str, Any], dotted: str) -> Any:
    cur: Any = report
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def stage_seconds(run_report: dict[str, Any]) -> float:
    """The stages' own times, as measured when each ran (a skipped stage keeps the time of its run)."""
    return sum(s["seconds"] for s in run_report["stages"] if isinstance(s.get("seconds"), (int, float)))


def _branch(stage: dict[str, Any]) -> str:
    """`` ← 00-prune`` for a stage that names the stages it reads (``from:``, a merge's ``models:``)."""
    return f" ← {', '.join(Path(r).name for r in stage['reads'])}" if stage.get("reads") else ""


def to_markdown(run_report: dict[str, Any]) -> str:
    skipped = sum(1 for s in run_report["stages"] if s.get("skipped"))
    total = f"- total time: {stage_seconds(run_report):.1f} s (each stage as measured when it ran)"
    if skipped:
        total += f"; this invocation {run_report['seconds']:.1f} s, {skipped} unchanged stage(s) skipped"
    lines = [
        f"# draftkit run: {run_report['recipe']}",
        "",
        f"- model: `{run_report['model']}`",
        f"- final model: `{run_report['final_model']}`",
        total,
        "",
        "| # | stage | status | time (s) | metrics |",
        "|---|---|---|---:|---|",
    ]
    for i, s in enumerate(run_report["stages"]):
        m = "; ".join(f"{k}: {v}" for k, v in stage_metrics(s["stage"], s.get("report") or {}).items())
        status = s["status"] + (" (skipped, unchanged)" if s.get("skipped") else "")
        secs = f"{s['seconds']:.1f}" if isinstance(s.get("seconds"), (int, float)) else ""
        lines.append(f"| {i} | {s['stage']}{_branch(s)} | {status} | {secs} | {m.replace('|', '/')} |")
    if run_report.get("gates"):
        lines += ["", f"## Gates: {'passed' if run_report.get('passed') else 'FAILED'}", "",
                  "| stage | gate | metric | value | threshold | verdict |", "|---|---|---|---:|---:|---|"]
        for g in run_report["gates"]:
            value = _fmt(g["value"]) if g.get("value") is not None else "n/a"
            lines.append(f"| {g['index']:02d}-{g['stage']} | {g['gate']} | {g['metric']} | {value} | {_fmt(g['threshold'])} "
                         f"| {'pass' if g['passed'] else '**fail**'} |")
    if run_report.get("gate_failures"):
        lines += ["", "**Quality gate failed:** " + "; ".join(run_report["gate_failures"])]
    if run_report.get("comparison"):
        from draftkit.compare import to_markdown as comparison_markdown

        lines += comparison_markdown(run_report["comparison"])
    for s in run_report["stages"]:
        serve = (s.get("report") or {}).get("serve")
        if serve:
            from draftkit.serve import to_markdown as serve_markdown

            lines += ["", "## Serving (" + s["stage"] + ")", ""] + serve_markdown(serve).splitlines()[2:]
    if run_report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).relative_to(run_report['output'])})" for p in run_report["plots"]]
    return "\n".join(lines) + "\n"


def _layer_sparsity_from_modules(modules: dict[str, float]) -> list[float]:
    per: dict[int, list[float]] = {}
    for name, sp in modules.items():
        m = re.search(r"\.(\d+)\.", name)
        if m:
            per.setdefault(int(m.group(1)), []).append(float(sp))
    return [sum(v) / len(v) for _, v in sorted(per.items())]


def make_plots(run_report: dict[str, Any], out: Path) -> list[str]:
    """Layer distances (prune), per-layer sparsity (sparsify), recovery per task (eval), when matplotlib is present."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    from draftkit.registry import stage as registered

    made = []
    for s in run_report["stages"]:
        entry = registered(str(s.get("stage")))
        if entry is not None and entry.plots is not None:  # the stage's own plots (draftkit.registry)
            made += entry.plots(s.get("report") or {}, out / "plots")
    if run_report.get("comparison"):
        from draftkit.compare import plot as plot_comparison

        made += [p for p in [plot_comparison(run_report["comparison"], out / "plots" / "night_over_night.png")] if p]
    return [str(p) for p in made]


def plot_layer_distances(r: dict[str, Any], plots: Path) -> list[Path]:
    """A prune stage's plot: the angular distance of each block it scored."""
    from draftkit.plots import plot_block_distances

    return [plot_block_distances(r, plots / "layer_distances.png")] if r.get("block_distances") else []


def plot_layer_sparsity(r: dict[str, Any], plots: Path) -> list[Path]:
    """A sparsify stage's plot: the sparsity of each decoder layer's linears."""
    from draftkit.plots import plot_series

    modules = r.get("per_module_sparsity") or r.get("modules") or {}
    if not isinstance(modules, dict) or not modules:
        return []
    values = {k: (v.get("sparsity") if isinstance(v, dict) else v) for k, v in modules.items()}
    per_layer = _layer_sparsity_from_modules({k: v for k, v in values.items() if isinstance(v, (int, float))})
    if not per_layer:
        return []
    return [plot_series(per_layer, plots / "layer_sparsity.png", title="sparsity per layer",
                        xlabel="decoder layer", ylabel="sparsity of linear weights")]


def plot_recovery(r: dict[str, Any], plots: Path) -> list[Path]:
    """An eval stage's plot: the recovery of each metric against the baseline."""
    rec = r.get("recovery")
    items = [(k, v) for k, v in rec.items() if isinstance(v, (int, float))] if isinstance(rec, dict) else []
    return [_bar(items, plots / "recovery.png", gate=(r.get("gate") or {}).get("min_recovery"))] if items else []


def _bar(items: list[tuple[str, float]], path: Path, gate: float | None = None) -> Path:
    """Recovery per metric against the baseline (1.0) and, when the recipe sets one, the gate."""
    from draftkit.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.bar([k for k, _ in items], [v for _, v in items])
    ax.axhline(1.0, color="gray", linestyle="--", label="baseline")
    if gate is not None:
        ax.axhline(gate, color="tab:red", linestyle="-", label=f"gate (min_recovery {gate:g})")
    ax.legend(loc="lower right")
    ax.set_ylabel("recovery (draft / baseline)")
    ax.set_title("quality recovery per metric")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_run_report(run_report: dict[str, Any], out: Path) -> None:
    run_report["plots"] = make_plots(run_report, out)
    atomic_write_json(out / "report.json", run_report)
    atomic_write_text(out / "report.md", to_markdown(run_report))


def render(run_report: dict[str, Any]) -> None:
    """Print the run's table with rich."""
    from rich.table import Table

    from draftkit import console

    t = Table(title=f"draftkit run: {run_report['recipe']}")
    for col in ("#", "stage", "status", "time (s)", "metrics"):
        t.add_column(col, overflow="fold")
    for i, s in enumerate(run_report["stages"]):
        m = "\n".join(f"{k}: {v}" for k, v in stage_metrics(s["stage"], s.get("report") or {}).items())
        secs = f"{s['seconds']:.1f}" if isinstance(s.get("seconds"), (int, float)) else ""
        t.add_row(str(i), s["stage"], s["status"] + (" (skipped)" if s.get("skipped") else ""), secs, m)
    console.out.print(t)
    console.out.print(f"final model: {run_report['final_model']}; report: {Path(run_report['output']) / 'report.md'}")
    comparison = run_report.get("comparison")
    if comparison:
        console.out.print(f"night over night ({comparison['labels'][-2]} -> now): {comparison['message']}")
    for f in run_report.get("gate_failures", []):
        console.out.print(f"[red]quality gate failed[/red]: {f}")


def write_error_report(out: Path, run_report: dict[str, Any], exc: BaseException) -> None:
    """report.json of a run a stage failed in: the stages done so far, ``passed: false`` and the error object
    with its exit code (CI reads a verdict, never a missing or empty report)."""
    from draftkit.errors import error_object
    from draftkit.gates import run_verdict

    _, gates = run_verdict(run_report.get("stages", []))
    try:
        atomic_write_json(out / "report.json", {**error_object(exc), "gates": gates, **run_report})
    except OSError:  # the error being reported matters more than its report
        pass
