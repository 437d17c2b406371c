"""``draftkit inspect`` (``draftkit models`` is in :mod:`draftkit.cli.models`: it imports no torch)."""

from __future__ import annotations

from rich.table import Table

from draftkit import console
from draftkit.cli._common import JsonOpt, ModelArg, emit, handle_errors
from draftkit.cli._options import Fields, config_options
from draftkit.stages import LoadConfig


@handle_errors
@config_options(load=Fields(LoadConfig, include=("trust_remote_code",)))
def inspect(model: ModelArg, json: JsonOpt = False, *, load: dict) -> None:
    """Show a model's architecture, layers, parameters, dtype, per-layer sparsity and draftkit provenance.

    Example: draftkit inspect runs/demo/01-sparsify
    """
    from draftkit.model_info import inspect_model

    emit(inspect_model(model, trust_remote_code=load["trust_remote_code"]), json, _render)


def _render(r: dict) -> None:
    t = Table(show_header=False, title=r["model"])
    for key in ("architecture", "model_type", "layers", "hidden_size", "dtype"):
        t.add_row(key, str(r[key]))
    t.add_row("parameters", f"{r['parameters']:,}")
    t.add_row("linear sparsity", f"{r['linear_sparsity']:.1%}")
    t.add_row("per-layer sparsity", " ".join(f"{s:.0%}" for s in r["layer_sparsity"]))
    if r.get("experts"):
        e = r["experts"]
        t.add_row("experts per layer", f"{' '.join(map(str, e['experts_per_layer']))} (top-{e['top_k']} per token"
                  + (", plus shared experts)" if e["shared_experts"] else ")"))
        t.add_row("active parameters per token", f"{e['active_parameters_per_token']:,}")
    prov = r.get("provenance")
    if prov:
        chain = []
        while prov:
            chain.append(prov.get("stage", "?"))
            prov = prov.get("parent")
        t.add_row("draftkit stages", " <- ".join(chain))
    console.out.print(t)
