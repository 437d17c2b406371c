"""``draftkit export`` and ``draftkit decompress``: the checkpoint users deploy, sparse or dense."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from draftkit import console
from draftkit.cli._common import OUTPUT, ModelArg, Output, build, default_output, emit, handle_errors
from draftkit.cli._options import LOAD_ONLY_STREAMED, Fields, config_options
from draftkit.export import ExportConfig
from draftkit.stages import LoadConfig, run_stage


@handle_errors
@config_options(cfg=Fields(ExportConfig), load=Fields(LoadConfig, exclude=("dtype", "compute", *LOAD_ONLY_STREAMED)), io=OUTPUT)
def export(model: ModelArg, *, cfg: dict, load: dict, io: Output) -> None:
    """Write a sparse (compressed-tensors sparse-bitmask) or dense safetensors checkpoint.

    Examples:

      draftkit export drafts/llama-50pct -o drafts/llama-50pct-sparse

      draftkit export drafts/llama-50pct -o drafts/llama-50pct-dense --format dense --dtype bfloat16

      draftkit export drafts/llama-50pct -o drafts/llama-50pct-dense --format dense --serve vllm --target llama-3.1-70b-instruct
    """
    console.set_quiet(io.quiet)
    config = build(ExportConfig, **cfg)
    out = io.output or default_output(model, f"{config.format if config.format != 'auto' else 'export'}")
    report = run_stage("export", model, config, out=out, load=build(LoadConfig, **load), overwrite=io.overwrite)
    emit(report, io.as_json, _render)
    if report["format"] == "sparse" and io.as_json:
        console.err.print(report["load_hint"], highlight=False, markup=False)
        console.err.print(report["serve_hint"], highlight=False, markup=False)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _render(report: dict) -> None:
    p = console.out.print
    p(f"{report['format']} checkpoint ({report['dtype']}) written to {report['output']} in {report['total_seconds']:.1f}s")
    p(f"  on disk: {_mb(report['bytes_on_disk'])} = {report['ratio_to_dense']:.3f} x the dense checkpoint ({_mb(report['dense_bytes'])})")
    if report["format"] == "sparse":
        p(f"  {report['compressed_modules']} linears compressed, structure {report['sparsity_structure']}, "
          f"sparsity {report['target_sparsity']:.4f} (global {report['global_sparsity']:.4f})")
        p(f"  layout theory at the measured sparsity: {_mb(report['theoretical_bytes'])} (on disk / theory = {report['ratio_to_theory']:.4f})")
        p(report["load_hint"], markup=False)
        p(report["serve_hint"], markup=False)
    if report.get("serve"):
        render_serve(report["serve"])


def render_serve(s: dict) -> None:
    p = console.out.print
    colour = {"ready": "green", "needs_heterogeneous_vocab": "yellow"}.get(s["status"], "red")
    p(f"serving with {s['engine']} next to {s['target']}: [{colour}]{s['status']}[/{colour}]: {s['reason']}", highlight=False)
    for c in s["checks"]:
        p(f"  {c['check']}: {c['level']}: {c['detail']}", markup=False)
    for kind, text in s["invocation"].items():
        p(f"  {kind}:", markup=False)
        p("\n".join("    " + line for line in text.splitlines()), markup=False)
    p(f"  (written to {s['draft']}/SERVE-{s['engine']}.md)", markup=False)


@handle_errors
@config_options(cfg=Fields(ExportConfig, include=("max_shard_size",)), io=OUTPUT)
def decompress(
    sparse: Annotated[str, typer.Argument(help="a sparse-bitmask checkpoint directory", show_default=False)],
    *,
    cfg: dict,
    io: Output,
) -> None:
    """Turn a sparse-bitmask checkpoint into dense safetensors (loads in vLLM, transformers, llama.cpp).

    Example:

      draftkit decompress drafts/llama-50pct-sparse -o drafts/llama-50pct-dense
    """
    from draftkit.export import decompress as run

    console.set_quiet(io.quiet)
    config = build(ExportConfig, **cfg)  # validates the size
    out = io.output or default_output(sparse, "dense")
    report = run(Path(sparse), out, overwrite=io.overwrite, max_shard_size=config.max_shard_size)
    emit(report, io.as_json, lambda r: console.out.print(
        f"dense checkpoint written to {r['output']}: {r['tensors']} tensors, {_mb(r['bytes_on_disk'])}"))
