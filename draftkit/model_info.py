"""Describe a model: architecture, layers, parameters, dtype, per-layer sparsity, provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from draftkit.checkpoint import load_model
from draftkit.modeling import count_parameters, decoder_layers, text_config
from draftkit.moe.stats import expert_summary
from draftkit.provenance import read_provenance
from draftkit.refs import resolve_model_ref
from draftkit.sparsify.masks import layer_sparsity, model_sparsity


def inspect_model(name: str, *, trust_remote_code: bool = False) -> dict[str, Any]:
    ref = resolve_model_ref(name)
    model = load_model(name, device="cpu", trust_remote_code=trust_remote_code)
    cfg = text_config(model)
    sp = model_sparsity(model)
    report: dict[str, Any] = {
        "model": name,
        "location": ref.location,
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "model_type": model.config.model_type,
        "layers": len(decoder_layers(model)),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "parameters": count_parameters(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "linear_sparsity": round(sp["overall"], 6),
        "layer_sparsity": [round(s, 6) for s in layer_sparsity(model)],
        "experts": expert_summary(model),
        "provenance": read_provenance(ref.location) if ref.local and Path(ref.location).is_dir() else None,
    }
    return report
