"""Sparsity masks: measure, check N:M patterns, extract from a sparse model, re-apply.

Used by sparsify (reporting), distill (holding masks fixed while training) and export.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from draftkit.modeling import decoder_layers
from draftkit.moe.arch import router_modules
from draftkit.moe.stats import expert_weights


def count_zeros(w: torch.Tensor) -> int:
    """Exact zeros in ``w``, counted without a temporary the size of ``w``: ``(w == 0).sum()`` makes a bool mask
    and sums it through an int64 copy, 9 bytes per value (2.4 GB for a bf16 embedding of Llama-3's vocabulary,
    the peak of a 1B-wide export)."""
    return w.numel() - int(torch.count_nonzero(w))


def tensor_sparsity(w: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return count_zeros(w) / max(w.numel(), 1)


def nm_violations(w: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of ``m`` consecutive weights along the input dimension with more than ``m - n``
    non-zeros, i.e. groups that break an N:M pattern (N zeros in every M). Zero means the pattern holds.

    Convention (as in SparseGPT and Wanda): ``n:m`` prunes ``n`` of every ``m`` weights, so 2:4 keeps 2.
    """
    if w.shape[-1] % m:
        raise ValueError(f"input width {w.shape[-1]} is not a multiple of M={m}")
    groups = (w.reshape(-1, m) != 0).sum(dim=1)
    return int((groups > m - n).sum().item())


def is_nm_sparse(w: torch.Tensor, n: int, m: int) -> bool:
    return w.shape[-1] % m == 0 and nm_violations(w, n, m) == 0


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4). Raises ValueError on a malformed pattern."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not m:
        raise ValueError(f"pattern {pattern!r} is neither 'unstructured' nor N:M such as 2:4")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"pattern {pattern!r}: N must satisfy 0 < N < M")
    return n, mm


def target_linears(model: nn.Module, targets: str | None = None, ignore: str | None = None) -> dict[str, nn.Linear]:
    """Linear layers inside the decoder blocks (embeddings and lm_head excluded), filtered by regexes
    on their full module names; ordered as the model's modules are."""
    layers = decoder_layers(model)
    layer_ids = {id(m) for layer in layers for m in layer.modules()}
    routers = {i for layer in layers for i in router_modules(layer)}  # an MoE router is never pruned
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) not in layer_ids or id(module) in routers:
            continue
        if targets and not re.search(targets, name):
            continue
        if ignore and re.search(ignore, name):
            continue
        out[name] = module
    return out


def decoder_weights(model: nn.Module, targets: str | None = None, ignore: str | None = None) -> dict[str, torch.Tensor]:
    """The prunable weights of the decoder: each targeted linear's weight (by module name) and each fused
    3-D routed-expert parameter of an MoE model (by parameter name), filtered by the same regexes."""
    out = {name: lin.weight for name, lin in target_linears(model, targets, ignore).items()}
    for name, w in expert_weights(model).items():
        if (not targets or re.search(targets, name)) and not (ignore and re.search(ignore, name)):
            out[name] = w
    return out


def masked_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight a mask named ``name`` applies to: a module's ``weight``, or a fused expert parameter."""
    try:
        return model.get_submodule(name).weight
    except AttributeError:
        return model.get_parameter(name)


def model_sparsity(model: nn.Module, targets: str | None = None, ignore: str | None = None) -> dict:
    """Per-module and overall sparsity of the targeted linear weights (and routed-expert weights)."""
    per_module = {}
    zeros = total = 0
    for name, w in decoder_weights(model, targets, ignore).items():
        z = count_zeros(w)
        per_module[name] = z / w.numel()
        zeros += z
        total += w.numel()
    return {"overall": zeros / total if total else 0.0, "modules": per_module}


def layer_sparsity(model: nn.Module) -> list[float]:
    """Sparsity of the linear (and fused expert) weights of each decoder block."""
    experts = {id(w) for w in expert_weights(model).values()}
    out = []
    for layer in decoder_layers(model):
        zeros = total = 0
        weights = [m.weight for m in layer.modules() if isinstance(m, nn.Linear)]
        weights += [p for p in layer.parameters() if id(p) in experts]
        for w in weights:
            zeros += count_zeros(w)
            total += w.numel()
        out.append(zeros / total if total else 0.0)
    return out


def extract_masks(model: nn.Module, *, min_sparsity: float = 0.0) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = non-zero) of the decoder linears (and fused expert parameters) whose
    sparsity exceeds ``min_sparsity``; see :func:`masked_weight` for what each name refers to."""
    masks = {}
    for name, w in decoder_weights(model).items():
        keep = w.detach() != 0
        if 1.0 - keep.float().mean().item() > min_sparsity:
            masks[name] = keep
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every weight outside its mask (in place)."""
    for name, keep in masks.items():
        w = masked_weight(model, name)
        w.mul_(keep.to(device=w.device, dtype=w.dtype))
