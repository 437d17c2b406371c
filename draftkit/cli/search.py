"""``draftkit search``: build and measure many draft candidates for a target; the frontier and the best one."""

from __future__ import annotations

from rich.table import Table

from draftkit import console
from draftkit.cli._common import OUTPUT, ModelArg, Output, build, default_output, emit, handle_errors
from draftkit.cli._options import LOAD_ONLY_STREAMED, Fields, config_options, nested
from draftkit.data import CalibConfig
from draftkit.search import SearchConfig
from draftkit.stages import LoadConfig, run_stage


@handle_errors
@config_options(cfg=Fields(SearchConfig), calib=nested(SearchConfig, "calib", rename={"path": "calib", "seed": "calib-seed"}),
                load=Fields(LoadConfig, exclude=LOAD_ONLY_STREAMED), io=OUTPUT)
def search(target: ModelArg, *, cfg: dict, calib: dict, load: dict, io: Output) -> None:
    """Build and measure draft candidates for a target (blocks dropped x sparsity x healing, or other bases): MAL, measured cost, predicted and engine speedup, the frontier, and the best draft as a recipe.

    Examples:

      draftkit search examples/tiny/teacher --drop 1,2 --healing none,sdd --dataset examples/tiny/data/train.jsonl --rows 64 --prompts examples/tiny/data/test.jsonl --prompt-limit 20 --calib examples/tiny/data/train.jsonl -o tiny-search

      draftkit search TARGET --drop 4,6,8 --sparsity 0,0.5,2:4 --healing none,sft,sdd --dataset sft.jsonl --prompts prompts.jsonl --keep frontier

      draftkit search TARGET --candidates d6/s0.5/sdd,d6/none --bases small-draft --dataset sft.jsonl --prompts prompts.jsonl

      torchrun --nproc-per-node 4 -m draftkit search TARGET ... --work-dir shared-work   (candidates spread over 4 processes)
    """
    console.set_quiet(io.quiet)
    out = io.output or default_output(target, "search")
    work = cfg.pop("work_dir") or str(out.with_name(out.name + "-work"))
    config = build(SearchConfig, **cfg, work_dir=work, calib=build(CalibConfig, "calib", **calib))
    report = run_stage("search", target, config, out=out, load=build(LoadConfig, **load), overwrite=io.overwrite)
    emit(report, io.as_json, _render)


def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _render(r: dict) -> None:
    p = console.out.print
    if not r.get("candidates"):
        p(f"process {r.get('rank', 0) + 1} of {r.get('processes', 1)}: its candidates are measured; the report is "
          "written by the first process")
        return
    k = r["k"]
    t = Table(title=f"{len(r['candidates'])} candidates for {r['target']} ({r['prompts']} prompts, k up to {k})")
    for col in ("candidate", "layers", "MACs", f"MAL k={k}", "cost c", "best k", "predicted", "engine", "frontier"):
        t.add_column(col, justify="left" if col == "candidate" else "right", no_wrap=col == "candidate")
    for c in r["candidates"]:
        eng = (c.get("engine") or {}).get("speedup")
        t.add_row(c["name"], str(c["layers"]), _f(c["macs_nonzero_rel"]), _f(c["mal_per_step"]), _f(c["c"], 3),
                  str(c["best_k"] or "-"), f"{_f(c['predicted_speedup'])}x", f"{_f(eng)}x" if eng else "-",
                  "*" if c["frontier"] else "", style="bold green" if c["name"] == r["best"] else None)
    p(t)
    verdict = "" if r.get("pays_off") else " - no candidate is predicted to pay off on this device"
    p(f"best: {r['best']} (predicted {_f(r['best_predicted_speedup'])}x{verdict}); frontier: {', '.join(r['frontier'])}")
    shared = ", ".join(f"{n} {s}" for s, n in r["shared_steps"].items())
    p(f"shared work: {shared} for {len(r['candidates'])} candidates")
    if r.get("best_recipe"):
        p(f"the best draft as a recipe: draftkit run {r['best_recipe']}")
    if r.get("plot"):
        p(f"plot: {r['plot']}")
    p(f"report written to {r['output']}/report.json in {r['total_seconds']:.1f}s")
