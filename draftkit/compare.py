"""Night over night: tonight's run against earlier runs of the same recipe (``draftkit run ... --compare PREV``).

Each metric of a run is the **target's** own score (eval's baseline: the checkpoint the draft is made from and
measured against) or the **draft's** (its task scores, recovery, spec's MAL and acceptance). Comparing both with
the last run attributes a regression: when the target's own scores fell, the draft's drop follows from it and the
night's failure is the target's; when only the draft's fell, it is the draft's.

Relative gates (``max_regression`` on eval and spec: the mean recovery / MAL may fall by at most this fraction
from the last run) are judged here, on the run report, since they need the previous run.

``--compare`` takes a run folder or its ``report.json``, several times for a history (oldest first; the last one
given is "the last run"). The comparison goes into ``report.json`` (``comparison``), ``report.md`` and
``plots/night_over_night.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from draftkit.errors import InvalidInputError

TOLERANCE = 0.02  # a relative change for the worse beyond this counts as a regression in the attribution


def load_previous(sources: list[str]) -> list[dict[str, Any]]:
    """The run reports ``--compare`` names (a run folder or its report.json), read before anything runs."""
    runs = []
    for source in sources:
        p = Path(source).expanduser()
        file = p / "report.json" if p.is_dir() else p
        if not file.is_file():
            raise InvalidInputError(f"--compare {source}: no report.json there; pass an earlier run's folder or its "
                                    "report.json")
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"--compare {source}: {file} is not readable JSON ({exc})") from None
        if isinstance(data, dict) and "stages" not in data:  # a failed night's error object: nothing to compare
            from draftkit.console import warn

            warn(f"--compare {source}: {file} has no stages (a failed run's report?); skipped")
            continue
        if not _is_report(data):
            raise InvalidInputError(f"--compare {source}: {file} is not a draftkit run report (stages must be a "
                                    "list of objects, output a string); pass an earlier run's report.json")
        runs.append({**data, "_source": str(file)})
    return runs


def _is_report(data: Any) -> bool:
    """The shape :func:`compare` and :func:`relative_gates` read: stages of objects whose report is an object."""
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        return False
    if not isinstance(data.get("output") or "", str):
        return False
    return all(isinstance(s, dict) and isinstance(s.get("report") or {}, dict) for s in data["stages"])


def _lower_is_better(metric: str) -> bool:
    from draftkit.evaluate import LOWER_IS_BETTER

    return metric.split(",")[0] in LOWER_IS_BETTER


def run_metrics(run_report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{metric: {"value", "role": "target" | "draft", "higher_is_better"}}`` of one run report."""
    out: dict[str, dict[str, Any]] = {}

    def put(key: str, value: Any, role: str, higher: bool = True) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = {"value": float(value), "role": role, "higher_is_better": higher}

    from draftkit.registry import stage as registered

    for i, s in enumerate(run_report.get("stages") or []):
        r, tag = s.get("report") or {}, f"{i:02d}-{s.get('stage')}"
        entry = registered(str(s.get("stage")))
        if entry is not None and entry.compared is not None:  # the stage's own metrics (draftkit.registry)
            entry.compared(r, tag, put)
    return out


def eval_metrics(r: dict[str, Any], tag: str, put) -> None:
    """An eval stage's metrics: each task's primary metric, its baseline's, and the mean recovery."""
    base = (r.get("baseline") or {}).get("tasks") or {}
    for task, metrics in (r.get("tasks") or {}).items():
        m = (r.get("primary") or {}).get(task)
        if not m or not isinstance(metrics, dict):
            continue
        higher = not _lower_is_better(m)
        put(f"{tag} {task} {m}", metrics.get(m), "draft", higher)
        put(f"{tag} baseline {task} {m}", (base.get(task) or {}).get(m), "target", higher)
    put(f"{tag} mean_recovery", r.get("mean_recovery"), "draft")


def spec_metrics(r: dict[str, Any], tag: str, put) -> None:
    """A spec stage's metrics: the mean accepted length and the acceptance rate."""
    for key in ("mal", "acceptance_rate"):
        put(f"{tag} {key}", r.get(key), "draft")


def _change(now: float, last: float | None) -> float | None:
    return None if last is None or last == 0 else (now - last) / abs(last)


def compare(current: dict[str, Any], previous: list[dict[str, Any]]) -> dict[str, Any]:
    """Every metric of ``current`` beside its values in ``previous`` (oldest first), and the attribution."""
    now, past = run_metrics(current), [run_metrics(p) for p in previous]
    rows = []
    for key, m in now.items():
        series = [p.get(key, {}).get("value") for p in past]
        last = next((v for v in reversed(series) if v is not None), None)
        change = _change(m["value"], last)
        worse = change is not None and (-change if m["higher_is_better"] else change) > TOLERANCE
        rows.append({"metric": key, "role": m["role"], "values": [*series, m["value"]], "last": last,
                     "now": m["value"], "change": change, "higher_is_better": m["higher_is_better"],
                     "regressed": worse})
    target = [r for r in rows if r["role"] == "target" and r["regressed"]]
    draft = [r for r in rows if r["role"] == "draft" and r["regressed"]]

    def said(rs: list[dict[str, Any]]) -> str:
        return ", ".join(f"{r['metric']} {r['last']:.4g} -> {r['now']:.4g}" for r in rs[:4])

    if target:
        who, message = "target", f"the target itself regressed ({said(target)})" + (
            f"; the draft's changes ({said(draft)}) follow from it" if draft else "")
    elif draft:
        has_target = any(r["role"] == "target" for r in rows)
        who, message = "draft", f"the draft regressed ({said(draft)})" + (
            "; the target's own scores held" if has_target else "; no target score was measured (add an eval "
            "stage with baseline: ${model} to tell target from draft)")
    else:
        who, message = "none", "no regression against the last run"
    labels = [_label(p) for p in previous] + ["now"]
    return {"previous": [p["_source"] for p in previous], "labels": labels, "metrics": rows,
            "attribution": who, "message": message}


def _label(run: dict[str, Any]) -> str:
    return Path(run.get("output") or Path(run["_source"]).parent).name or run["_source"]


def relative_gates(current: dict[str, Any], previous: list[dict[str, Any]], configs: list[Any]) -> list[dict[str, Any]]:
    """``max_regression`` of each eval/spec stage against the last run (skipped, and passed, without one)."""
    last = previous[-1] if previous else None
    from draftkit.registry import stage as registered

    results = []
    for i, (s, cfg) in enumerate(zip(current.get("stages") or [], configs, strict=False)):
        threshold = getattr(cfg, "max_regression", None)
        entry = registered(str(s.get("stage")))
        metric = entry.relative_gate if entry is not None else None  # the metric its max_regression bounds
        if threshold is None or metric is None:
            continue
        value = (s.get("report") or {}).get(metric)
        before = None
        if last is not None:
            old = (last.get("stages") or [])[i:i + 1]
            if old and old[0].get("stage") == s.get("stage"):
                before = (old[0].get("report") or {}).get(metric)
        base = {"stage": s["stage"], "index": i, "dir": s.get("dir"), "gate": "max_regression", "metric": metric,
                "value": value, "previous": before, "threshold": threshold}
        if before is None or not isinstance(value, (int, float)):
            results.append({**base, "passed": True, "skipped": True,
                            "message": f"{metric}: no value of the last run to compare with (--compare)"})
            continue
        change = _change(float(value), float(before)) or 0.0
        ok = change >= -threshold
        results.append({**base, "change": change, "passed": ok,
                        "message": f"{metric} {value:.4f} {'fell' if change < 0 else 'rose'} {abs(change):.1%} from "
                        f"{before:.4f} (last run) {'<=' if ok else '>'} max_regression {threshold:g}"})
    return results


def apply(run_report: dict[str, Any], previous: list[dict[str, Any]], configs: list[Any]) -> None:
    """Add the comparison (when ``previous``) and the relative gates to a run report, in place."""
    rel = relative_gates(run_report, previous, configs)
    failures = run_report.setdefault("gate_failures", [])
    run_report["gates"] = [*run_report.get("gates", []), *rel]
    for g in rel:
        if not g["passed"]:
            failures.append(f"{g['index']:02d}-{g['stage']}: {g['message']}")
    run_report["passed"] = run_report.get("passed", True) and all(g["passed"] for g in rel)
    if previous:
        comparison = run_report["comparison"] = compare(run_report, previous)
        if comparison["attribution"] != "none":  # say whose regression a failed gate is, in its own line
            failures[:] = [f"{f} [{comparison['message']}]" for f in failures]


def to_markdown(comparison: dict[str, Any]) -> list[str]:
    """The "Night over night" section of report.md."""
    labels = comparison["labels"]
    lines = ["", "## Night over night", "", f"**{comparison['attribution']}**: {comparison['message']}", "",
             "| metric | role | " + " | ".join(labels) + " | change | |", "|---|---|" + "---:|" * len(labels) + "---:|---|"]
    for r in comparison["metrics"]:
        vals = " | ".join("" if v is None else f"{v:.4g}" for v in r["values"])
        change = "" if r["change"] is None else f"{r['change']:+.1%}"
        lines.append(f"| {r['metric']} | {r['role']} | {vals} | {change} | {'**regressed**' if r['regressed'] else ''} |")
    return lines


def plot(comparison: dict[str, Any], path: Path) -> Path | None:
    """Each metric over the runs given, one small panel per metric (target's in one colour, draft's in another)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    from draftkit.plots import _pyplot

    rows = comparison["metrics"]
    if not rows:
        return None
    plt = _pyplot()
    cols = min(3, len(rows))
    n_rows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 2.6 * n_rows), dpi=110, squeeze=False)
    x = list(range(len(comparison["labels"])))
    for ax, r in zip(axes.flat, rows, strict=False):
        pts = [(i, v) for i, v in zip(x, r["values"], strict=True) if v is not None]
        ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o",
                color="tab:orange" if r["role"] == "target" else "tab:blue")
        ax.set_title(f"{r['metric']} ({r['role']})", fontsize=8)
        ax.set_xticks(x, comparison["labels"], fontsize=7, rotation=20)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
