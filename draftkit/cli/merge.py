"""``draftkit merge``: SLERP, linear or task-arithmetic merge of models of one architecture, mask-aware."""

from __future__ import annotations

from typing import Annotated

import typer

from draftkit import console
from draftkit.atomic import check_output_dir
from draftkit.cli._common import OUTPUT, Output, build, default_output, emit, handle_errors
from draftkit.cli._options import LOAD_ONLY_STREAMED, Fields, config_options
from draftkit.lock import output_lock_of
from draftkit.merge import MergeConfig, merge_checkpoints
from draftkit.refs import resolve_model_ref
from draftkit.stages import LoadConfig

ModelsArg = Annotated[list[str], typer.Argument(
    help="two or more models of one architecture: local directories, aliases or hub ids (SLERP: the first is t=0)",
    show_default=False)]


@handle_errors
@config_options(cfg=Fields(MergeConfig, exclude=("models",)),
                load=Fields(LoadConfig, exclude=("device", "compute", *LOAD_ONLY_STREAMED)), io=OUTPUT)
def merge(models: ModelsArg, *, cfg: dict, load: dict, io: Output) -> None:
    """Merge models tensor by tensor (SLERP, linear, task arithmetic), keeping their sparsity masks.

    Reads every input lazily, a chunk of one tensor at a time, and writes the output shard by shard:
    memory stays a few chunks whatever the model size. The merge runs on the CPU. Sparse inputs with
    identical masks give that mask exactly; different masks need --masks. The output's sparsity is
    reported per layer; a sparse merge goes to `draftkit export --format sparse` as it is.

    Examples:

      draftkit merge drafts/student-gsm8k drafts/student-chat --method slerp --t 0.5 -o drafts/merged

      draftkit merge A B --t-filters self_attn=0.3,mlp=0.7 -o merged     (t per tensor kind, as mergekit's filters)

      draftkit merge A B C --method linear --weights 0.5,0.25,0.25 -o merged

      draftkit merge A B --method task-arithmetic --base drafts/pruned --weights 0.6,0.6 -o merged
    """
    console.set_quiet(io.quiet)
    config = build(MergeConfig, **cfg, models=list(models))
    out = io.output or default_output(models[0], f"merge-{config.method}")
    inputs = [*models, *([config.base] if config.base else [])]
    for model in inputs:  # a mistyped input is named before the output is looked at
        resolve_model_ref(model)
    out = check_output_dir(out, overwrite=io.overwrite, inputs=inputs)
    with output_lock_of(out, "merge"):  # a second writer of the same -o: one line naming the first, as every command
        report = merge_checkpoints(list(models), config, out=out, load=build(LoadConfig, **load),
                                   overwrite=io.overwrite)
    emit(report, io.as_json, _render)


def _render(report: dict) -> None:
    p = console.out.print
    how = f"t={report['t']}" if report["method"] == "slerp" else f"weights {report['weights']}"
    p(f"{report['method']} merge ({how}) of {len(report['models'])} models written to {report['output']} "
      f"in {report['seconds']:.1f}s")
    if report["method"] == "slerp" and report["parallel_fallback"]:
        p(f"  {report['parallel_fallback']} nearly parallel tensors merged by linear interpolation")
    if report["sparse_tensors"]:
        diff = report["tensors_with_different_masks"]
        rule = f"masks {report['masks']} on {diff} tensors whose masks differ" if diff else "identical masks kept"
        p(f"  {report['sparse_tensors']} sparse tensors ({rule}); sparsity of the inputs "
          + ", ".join(f"{s:.1%}" for s in report["input_sparsity"]) + f", of the merge {report['sparsity']:.1%}")
        p("  per layer: " + " ".join(f"{s:.0%}" for s in report["layer_sparsity"]))
