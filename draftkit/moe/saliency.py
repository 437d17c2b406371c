"""Expert saliency (REAP and the paper's baselines) and the choice of experts to keep, as tensor functions.

REAP (Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression", eq. 9):
``S_j = 1/|X_j| Σ_{x ∈ X_j} g_j(x) · ‖f_j(x)‖₂``, the mean over the tokens ``X_j`` routed to expert ``j`` of its
gate value times the L2 norm of its output. ``g_j(x)`` is the weight the model multiplies the expert's output
by (after any top-k renormalisation), as llm-compressor's ``REAPPruningModifier`` reads it.
Baselines (the paper's section 5): ``frequency`` = ``|X_j|``, how often ``j`` is routed; ``ean`` = expert
activation norm ``Σ_{x ∈ X_j} ‖f_j(x)‖₂``, without router weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

METHODS = ("reap", "frequency", "ean")


@dataclass
class SaliencyStats:
    """Running sums over the calibration tokens for the ``num_experts`` experts of one MoE block (float64)."""

    num_experts: int
    count: torch.Tensor = field(init=False)  # |X_j|
    gate_norm_sum: torch.Tensor = field(init=False)  # Σ g_j(x)·‖f_j(x)‖
    norm_sum: torch.Tensor = field(init=False)  # Σ ‖f_j(x)‖

    def __post_init__(self) -> None:
        self.count = torch.zeros(self.num_experts, dtype=torch.float64)
        self.gate_norm_sum = torch.zeros(self.num_experts, dtype=torch.float64)
        self.norm_sum = torch.zeros(self.num_experts, dtype=torch.float64)

    @torch.no_grad()
    def update(self, j: int, g: torch.Tensor, f: torch.Tensor) -> None:
        """Expert ``j`` on its routed tokens: gate values ``g`` ``[n]`` and outputs ``f`` ``[n, hidden]``."""
        norms = torch.linalg.vector_norm(f.double(), dim=-1)
        self.count[j] += norms.numel()
        self.gate_norm_sum[j] += float((g.double() * norms).sum())
        self.norm_sum[j] += float(norms.sum())


def saliency(stats: SaliencyStats, method: str) -> torch.Tensor:
    """``[num_experts]`` float64 saliency; an expert no token reached scores 0."""
    if method == "reap":
        return stats.gate_norm_sum / stats.count.clamp(min=1.0)
    if method == "frequency":
        return stats.count.clone()
    if method == "ean":
        return stats.norm_sum.clone()
    raise ValueError(f"unknown expert saliency {method!r}; choose one of {', '.join(METHODS)}")


def experts_to_keep(S: torch.Tensor, n_drop: int, n_group: int | None = None) -> list[int]:
    """Indices (ascending) of the experts kept when the ``n_drop`` of lowest saliency ``S`` are removed.

    With grouped routing (``n_group`` contiguous groups, DeepSeek-V3 style) the same number is removed from
    each group, so the groups stay equal and ``topk_group`` still selects whole groups. Ties are broken as
    ``torch.topk`` breaks them (as llm-compressor does).
    """
    E = S.numel()
    groups = n_group or 1
    size = E // groups
    per_group = n_drop // groups
    keep: list[int] = []
    for g in range(groups):
        lo = g * size
        drop = {lo + int(i) for i in torch.topk(S[lo : lo + size], per_group, largest=False).indices.tolist()}
        keep.extend(i for i in range(lo, lo + size) if i not in drop)
    return keep
