"""``draftkit prune``: drop whole decoder blocks chosen on calibration data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from draftkit import console
from draftkit.cli._common import OUTPUT, ModelArg, Output, build, default_output, emit, handle_errors
from draftkit.cli._options import Fields, config_options, nested
from draftkit.data import CalibConfig
from draftkit.prune import PruneConfig
from draftkit.stages import LoadConfig, run_stage


@handle_errors
@config_options(cfg=Fields(PruneConfig, short={"layers": "-n"}), calib=nested(PruneConfig, "calib", rename={"path": "calib"}),
                load=Fields(LoadConfig), io=OUTPUT)
def prune(
    model: ModelArg,
    plot: Annotated[Path | None, typer.Option("--plot", help="write a PNG of distance per start layer (needs matplotlib)")] = None,
    *,
    cfg: dict,
    calib: dict,
    load: dict,
    io: Output,
) -> None:
    """Drop N decoder blocks, scored by angular distance between hidden states.

    Examples:

      draftkit prune --layers 6 llama-3.1-8b -o llama-3.1-8b-prune6

      draftkit prune examples/tiny/teacher --layers 2 --calib examples/tiny/data/train.jsonl --samples 64

      draftkit prune MODEL --drop 20-25            (explicit, inclusive indices; no calibration)

      draftkit prune qwen3-moe-model --experts 0.5 --layers 2   (REAP: half the experts of every MoE layer)
    """
    console.set_quiet(io.quiet)
    config = build(PruneConfig, **cfg, calib=build(CalibConfig, "calib", **calib))
    n = f"{config.layers}" if config.layers else "x"
    out = io.output or default_output(model, f"prune{n}")
    if plot is not None:
        from draftkit.plots import require_matplotlib

        require_matplotlib()  # before hours of scoring, not after the output is written
    report = run_stage("prune", model, config, out=out, load=build(LoadConfig, **load), overwrite=io.overwrite)
    if plot is not None and report.get("block_distances"):
        from draftkit.plots import plot_block_distances

        plot_block_distances(report, plot)
        report["plot"] = str(plot)
    emit(report, io.as_json, _render)


def _render(report: dict) -> None:
    dist = report.get("block_distances")
    dropped = set(report["dropped_layers"])
    if dist:
        t = Table(title=f"angular distance of each {dist[0]['end'] - dist[0]['start'] + 1}-layer block")
        t.add_column("block")
        t.add_column("distance", justify="right")
        t.add_column("BI (first layer)", justify="right")
        bi = report.get("block_influence", [])
        for d in dist:
            chosen = report["method"] == "angular" and d["start"] in dropped and d["start"] == min(dropped)
            style = "bold green" if chosen else None
            t.add_row(f"{d['start']}-{d['end']}", f"{d['distance']:.4f}", f"{bi[d['start']]:.4f}" if bi else "", style=style)
        console.out.print(t)
    experts = report.get("experts")
    if experts:
        console.out.print(f"experts removed ({experts['method']}): {experts['experts_before']} -> "
                          f"{experts['experts_after']} per MoE layer, kept: "
                          + "; ".join(f"{n}: {v['kept']}" for n, v in experts["layers"].items()))
    what = f"dropped layers {sorted(dropped)} ({report['method']})" if report["method"] else "no layer dropped"
    console.out.print(
        f"{what}: {report['layers_before']} -> {report['layers_after']} layers, "
        f"{report['params_before'] / 1e6:.2f}M -> {report['params_after'] / 1e6:.2f}M parameters"
    )
    console.out.print(f"saved to {report['output']} in {report['total_seconds']:.1f}s")
