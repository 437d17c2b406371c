"""``draftkit eval``: quality on local and lm-eval tasks, recovery against a baseline, a CI gate."""

from __future__ import annotations

from rich.table import Table

from draftkit import console
from draftkit.cli._common import REPORT_OUTPUT, ModelArg, Output, build, handle_errors, run_report_stage
from draftkit.cli._options import Fields, config_options
from draftkit.evaluate import EvalConfig
from draftkit.stages import LoadConfig


@handle_errors
@config_options(cfg=Fields(EvalConfig), load=Fields(LoadConfig), io=REPORT_OUTPUT)
def evaluate(model: ModelArg, *, cfg: dict, load: dict, io: Output) -> None:
    """Evaluate a model; with --baseline, report quality recovery and gate on it (exit code 3).

    Examples:

      draftkit eval drafts/tiny-prune2 --tasks tiny-arith --baseline examples/tiny/teacher --min-recovery 0.9

      draftkit eval drafts/llama-prune6 --tasks arc_easy,hellaswag --limit 200 --baseline llama-3.1-8b

      draftkit eval MODEL --ppl notes.txt --json

      draftkit eval checkpoints/llama-3.1-8b --ppl notes.txt --stream on
    """
    console.set_quiet(io.quiet)
    run_report_stage("eval", model, build(EvalConfig, **cfg), output=io.output, load=build(LoadConfig, **load),
                     overwrite=io.overwrite, as_json=io.as_json, render=_render)


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _render(report: dict) -> None:
    base = (report.get("baseline") or {}).get("tasks", {})
    rec = report.get("recovery", {})
    t = Table(title="evaluation")
    for col in ("task", "metric", "model", "baseline", "recovery"):
        t.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, metrics in report["tasks"].items():
        primary = report["primary"].get(task)
        for m, v in metrics.items():
            if not isinstance(v, float):
                continue
            t.add_row(task, m, _fmt(v), _fmt(base.get(task, {}).get(m)), _fmt(rec.get(task)) if m == primary else "")
    console.out.print(t)
    if report.get("mean_recovery") is not None:
        cached = " (baseline from cache)" if report["baseline"].get("cached") else ""
        console.out.print(f"mean recovery {report['mean_recovery']:.4f} against {report['baseline']['model']}{cached}")
    gate = report.get("gate")
    if gate:
        style = "green" if gate["passed"] else "red"
        console.out.print(f"[{style}]{gate['message']}[/{style}]")
    if report.get("output"):
        console.out.print(f"report written to {report['output']}/report.json")
