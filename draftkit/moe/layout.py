"""An MoE model's weights in the layout its checkpoints store: the fused 3-D routed-expert parameters split into
one 2-D weight per expert and projection (``mlp.experts.3.gate_proj.weight``, Mixtral's
``block_sparse_moe.experts.3.w1.weight``), by transformers' own reverse conversion (what ``save_pretrained``
writes). Exports use it, so a dense export is what serving engines read, and the sparse-bitmask format, whose
groups are 2-D weights (``M.shape`` is ``[rows, cols]``), can compress every expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from draftkit.moe.stats import expert_weights


@dataclass
class StoredLayout:
    """``state`` under the stored names; ``rename``: a module's name in the model -> in ``state`` (only those
    that differ); ``experts``: the per-expert 2-D weight keys split out of the fused parameters."""

    state: dict[str, torch.Tensor]
    rename: dict[str, str] = field(default_factory=dict)
    experts: list[str] = field(default_factory=list)


def stored_layout(model: Any, state: dict[str, torch.Tensor], modules: list[str]) -> StoredLayout:
    """``state`` (the model's state dict, tied copies dropped) as ``save_pretrained`` stores it, for a model with
    fused routed experts; unchanged otherwise. ``modules`` (module names whose ``.weight`` is in ``state``) get
    their stored names in ``rename``."""
    from transformers.core_model_loading import revert_weight_conversion

    fused = [k for k in expert_weights(model) if k in state]
    if not fused:
        return StoredLayout(state)
    stored = revert_weight_conversion(model, state)
    experts = [k for k, t in revert_weight_conversion(model, {k: state[k] for k in fused}).items() if t.dim() == 2]
    rename = {}
    for m in modules:
        (key,) = revert_weight_conversion(model, {f"{m}.weight": state[f"{m}.weight"]})
        if key != f"{m}.weight":
            rename[m] = key.removesuffix(".weight")
    return StoredLayout(stored, rename, experts)
