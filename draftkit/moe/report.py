"""What the sparsify report says about the experts of an MoE model."""

from __future__ import annotations

import math
import re
from typing import Any

from torch import nn

from draftkit.moe.arch import is_moe

_EXPERT = re.compile(r"^(.*\.experts\.\d+)\.[^.]+$")


def moe_sparsity_report(model: nn.Module, report: dict[str, Any]) -> dict[str, Any]:
    """``{"experts": {...}}`` for an MoE model (nothing for a dense one): how many of the targeted weights are
    expert weights and how sparse they are, and which experts no calibration token reached (pruned by
    magnitude instead of the asked method)."""
    if not is_moe(model):
        return {}
    modules = report.get("modules", {})
    weights = zeros = 0.0
    no_tokens: list[str] = []
    for name, entry in modules.items():
        m = _EXPERT.match(name)
        if m is None:
            continue
        n = math.prod(entry["shape"])
        weights += n
        zeros += entry["sparsity"] * n
        if "pruned_by" in entry and m.group(1) not in no_tokens:
            no_tokens.append(m.group(1))
    total = report.get("targeted_weights") or 1
    return {"experts": {
        "weights": int(weights),
        "share_of_targeted": round(weights / total, 6),
        "sparsity": round(zeros / weights, 6) if weights else None,
        "without_tokens": no_tokens,
    }}
