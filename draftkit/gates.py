"""Quality gates: thresholds on what a stage measured, judged apart from the measurement.

A gate is a config field of a measuring stage (eval: ``min_recovery`` on the mean, ``min_task_recovery`` on each
task; spec: ``min_mal``, ``min_acceptance``, ``min_speedup``; both: ``max_regression`` against the last run, judged
by :mod:`draftkit.compare`). It does not change what the stage computes, so it is
not part of the stage's fingerprint (:func:`without_gates`): a changed threshold re-reads the stored metrics and
re-judges them (:func:`judge`) instead of rerunning the stage.

:func:`judge` writes three keys into a stage's report:

* ``gates``: one entry per gate set, ``{"gate", "metric", "value", "threshold", "passed", "message"}``;
* ``passed``: every gate passed (true when none is set);
* ``gate``: ``{"passed", "message", ...}``, the summary the stage runner raises :class:`GateFailedError` on.
"""

from __future__ import annotations

from typing import Any


def _gates(stage: str) -> tuple[tuple[str, str, str], ...]:
    """The gate fields a stage registers (:mod:`draftkit.registry`): (field, metric it bounds, ">=" or "<=")."""
    from draftkit.registry import stage as registered

    entry = registered(stage)
    return tuple(entry.gates) if entry is not None else ()


# report keys an engine writes its measured speedup under (spec --engine hf|vllm), first found wins
SPEEDUP_KEYS = ("speedup", "engine_speedup")


# the relative gate, judged on the run report against the last run (draftkit.compare), of a stage that registers
# the metric it bounds (``relative_gate``)
RELATIVE_FIELD = "max_regression"


def gate_fields(stage: str) -> tuple[str, ...]:
    from draftkit.registry import stage as registered

    entry = registered(stage)
    relative = (RELATIVE_FIELD,) if entry is not None and entry.relative_gate else ()
    return tuple(f for f, _, _ in _gates(stage)) + relative


def without_gates(stage: str, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without its gate thresholds: what a stage's output depends on."""
    drop = gate_fields(stage)
    return {k: v for k, v in config.items() if k not in drop}


def _speedup(report: dict[str, Any]) -> float | None:
    for key in SPEEDUP_KEYS:
        v = report.get(key)
        if isinstance(v, dict):
            v = next((v[k] for k in ("median", "value", "mean") if isinstance(v.get(k), (int, float))), None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _one(gate: str, metric: str, value: float | None, threshold: float, op: str = ">=") -> dict[str, Any]:
    ok = value is not None and (value >= threshold if op == ">=" else value <= threshold)
    shown = f"{value:.4f}" if value is not None else "n/a (not measured)"
    sign = op if ok else ("<" if op == ">=" else ">")
    return {"gate": gate, "metric": metric, "value": value, "threshold": threshold, "passed": ok,
            "message": f"{metric} {shown} {sign} {gate} {threshold:g}"}


def evaluate_gates(stage: str, cfg: Any, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The result of every gate ``cfg`` sets, judged on the metrics in ``report`` (a pure function)."""
    results: list[dict[str, Any]] = []
    for field, metric, op in _gates(stage):
        threshold = getattr(cfg, field, None) if not isinstance(cfg, dict) else cfg.get(field)
        if threshold is None:
            continue
        if field == "min_task_recovery":
            per_task = report.get("recovery") or {}
            if not per_task:
                results.append(_one(field, "recovery", None, threshold, op))
            for task, value in per_task.items():
                results.append(_one(field, f"recovery[{task}]", value, threshold, op))
        elif field == "min_speedup":
            results.append(_one(field, "speedup", _speedup(report), threshold, op))
        else:
            value = report.get(metric)
            results.append(_one(field, metric, value if isinstance(value, (int, float)) else None, threshold, op))
    return results


def judge(stage: str, cfg: Any, report: dict[str, Any]) -> dict[str, Any]:
    """Set ``report["gates"]``, ``report["passed"]`` and ``report["gate"]`` from ``cfg``'s thresholds; returns
    ``report``. Idempotent: judging again with other thresholds replaces the verdict, never the metrics."""
    results = evaluate_gates(stage, cfg, report)
    passed = all(r["passed"] for r in results)
    report["gates"] = results
    report["passed"] = passed
    if not results:
        report.pop("gate", None)
        return report
    failed = [r["message"] for r in results if not r["passed"]]
    shown = "; ".join(failed) if failed else "; ".join(r["message"] for r in results)
    gate: dict[str, Any] = {"passed": passed, "message": f"quality gate {'passed' if passed else 'failed'}: {shown}"}
    for field, metric, _ in _gates(stage):  # the thresholds and headline values, flat (report.md, plots)
        value = getattr(cfg, field, None) if not isinstance(cfg, dict) else cfg.get(field)
        if value is not None:
            gate[field] = value
            if metric != "recovery":
                gate[metric] = report.get(metric) if metric != "speedup" else _speedup(report)
    report["gate"] = gate
    return report


def rejudge_stored(stage: str, cfg: Any, report: dict[str, Any], stage_dir) -> dict[str, Any]:
    """Judge a reused stage's stored report with today's thresholds; its folder's report.json follows."""
    import json
    from pathlib import Path

    from draftkit.atomic import atomic_write_json

    before = (report.get("gates"), report.get("passed"))
    judge(stage, cfg, report)
    file = Path(stage_dir) / "report.json"
    if (report.get("gates"), report.get("passed")) != before and file.is_file():
        try:
            stored = json.loads(file.read_text())
            stored["report"] = judge(stage, cfg, stored.get("report") or {})
            atomic_write_json(file, stored)
        except (OSError, ValueError):  # the manifest holds the verdict; the folder's copy is informative
            pass
    return report


def run_verdict(results: list[dict[str, Any]]) -> tuple[bool, list[dict[str, Any]]]:
    """``(passed, gates)`` of a run: every stage's gate results, each with the stage and its folder."""
    gates = []
    for i, s in enumerate(results):
        for g in (s.get("report") or {}).get("gates") or []:
            gates.append({"stage": s["stage"], "index": i, "dir": s.get("dir"), **g})
    return all(g["passed"] for g in gates), gates
