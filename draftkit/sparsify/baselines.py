"""Baseline pruning criteria as pure functions on tensors.

* Magnitude: prune the smallest |W| over the whole matrix (unstructured) or within every M input columns.
* Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models", eq. 1):
  score S_ij = |W_ij| · ||X_j||₂, compared per output row (section 3, "comparison group"), or within every M
  input columns for N:M. Follows locuslab/wanda's ``prune_wanda``; ||X_j||² is read from the diagonal of the
  same Hessian SparseGPT uses (H_jj = 2/n Σ x_j², a constant factor away from Wanda's ``scaler_row``).

Every function returns a bool mask, True = pruned. No weight update is made (unlike SparseGPT).
"""

from __future__ import annotations

import torch


def nm_mask(scores: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """Prune the ``prune_n`` lowest scores of every ``prune_m`` consecutive input columns."""
    rows, cols = scores.shape
    if cols % prune_m:
        raise ValueError(f"input width {cols} is not a multiple of M={prune_m}")
    groups = scores.reshape(rows, cols // prune_m, prune_m)
    idx = torch.topk(groups, prune_n, dim=-1, largest=False)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def unstructured_mask(scores: torch.Tensor, sparsity: float, *, per_row: bool) -> torch.Tensor:
    """Prune exactly ``floor(sparsity · n)`` lowest scores, n being the row length (``per_row``) or the
    whole matrix."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if per_row:
        k = int(scores.shape[1] * sparsity + 1e-6)
        if k:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False)[1], True)
    else:
        k = int(scores.numel() * sparsity + 1e-6)
        if k:
            mask.view(-1)[torch.topk(scores.flatten(), k, largest=False)[1]] = True
    return mask


def magnitude_mask(W: torch.Tensor, *, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """Magnitude pruning mask of ``W`` (``[rows, columns]``)."""
    scores = W.detach().float().abs()
    if prune_n:
        return nm_mask(scores, prune_n, prune_m)
    return unstructured_mask(scores, sparsity, per_row=False)


def wanda_mask(
    W: torch.Tensor, input_sq_norms: torch.Tensor, *, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0
) -> torch.Tensor:
    """Wanda mask of ``W`` given ``input_sq_norms[j]`` ∝ ||X_j||² (e.g. ``diag(H)``)."""
    W_metric = W.detach().float().abs() * torch.sqrt(input_sq_norms.float().to(W.device)).reshape(1, -1)
    if prune_n:
        return nm_mask(W_metric, prune_n, prune_m)
    return unstructured_mask(W_metric, sparsity, per_row=True)
