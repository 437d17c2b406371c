"""One decoder layer's linears pruned from the Hessians of their inputs (the sparsify driver's worker)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from draftkit import console
from draftkit.compute import Masters
from draftkit.errors import InvalidInputError
from draftkit.sparsify.baselines import magnitude_mask, wanda_mask
from draftkit.sparsify.config import SparsifyConfig
from draftkit.sparsify.masks import tensor_sparsity
from draftkit.sparsify.sparsegpt import (
    PRECISION,
    InverseHessian,
    inverse_hessian_cholesky,
    reconstruction_error,
    sparsegpt_prune_many,
)


@dataclass
class _Group:
    """Linears reading one input tensor, with the Hessian and factor they share."""

    H: torch.Tensor | None = None
    tokens: int = 0
    inv: InverseHessian | None = None
    members: list[str] = field(default_factory=list)
    # The input tensor itself: linears sharing a group are called with this very object. Holding the
    # reference keeps it alive, so a later input can never reuse its memory and be mistaken for it.
    x: torch.Tensor | None = None


class LayerPruner:
    """Prunes the targeted linears of one decoder layer from the Hessians of their inputs.

    ``relative`` maps each linear to its name inside its decoder layer (``self_attn.q_proj``);
    ``siblings`` learns, from the layers already pruned, which linears read the same input, so the
    next layers prune a whole group (q/k/v, gate/up) in one SparseGPT column loop. Masks and updates are
    computed from the master weights (``masters``: the stored dtype when the forward runs in another); the
    result goes to the master and to the weight the rest of the forward uses.
    """

    def __init__(self, cfg: SparsifyConfig, names: dict[nn.Module, str], report: dict[str, Any], bar,
                 relative: dict[nn.Module, str] | None = None, masters: Masters | None = None):
        self.cfg = cfg
        self.masters = masters if masters is not None else Masters(None)  # weights cast to the compute dtype -> their stored tensors
        self.names = names
        self.relative = relative or {}
        self.report = report
        self.bar = bar
        self.pruned: set[str] = set()
        self.siblings: dict[str, tuple[str, ...]] = {}

    def learn_group(self, modules: list[nn.Module]) -> None:
        rel = tuple(self.relative.get(m, self.names[m]) for m in modules)
        for r in rel:
            self.siblings[r] = rel

    def prune(self, lin: nn.Linear, group: _Group) -> None:
        self.prune_group([lin], group)

    def prune_group(self, lins: list[nn.Linear], group: _Group) -> None:
        """Prune linears that read the same input (one Hessian, one H⁻¹ factor, one column loop)."""
        cfg = self.cfg
        if self.bar is not None:
            self.bar.update(0, status=self.names[lins[0]])
        t0 = time.perf_counter()
        n_m = cfg.nm or (0, 0)
        # a linear never called during the calibration forward (e.g. an unused expert) has no Hessian: magnitude
        method = cfg.method if group.H is not None else "magnitude"
        if method == "sparsegpt":
            if group.inv is None:
                try:
                    group.inv = inverse_hessian_cholesky(group.H, cfg.dampening)
                except torch.linalg.LinAlgError as exc:  # bad input (too few samples, too little dampening)
                    raise InvalidInputError(f"{self.names[lins[0]]}: {exc}") from None
                if group.inv.retries:
                    console.warn(
                        f"{self.names[lins[0]]}: Cholesky failed, retried with dampening {group.inv.dampening:g} "
                        f"(asked {cfg.dampening:g})"
                    )
            results = sparsegpt_prune_many(
                [self._weight(lin) for lin in lins], group.inv, sparsity=cfg.target_sparsity,
                prune_n=n_m[0], prune_m=n_m[1], block_size=cfg.block_size,
            )
            new_weights = [W_new for W_new, _, _ in results]
            del results
        else:
            new_weights = []
            for lin in lins:
                W = self._weight(lin)
                if method == "wanda":
                    mask = wanda_mask(W, torch.diag(group.H), sparsity=cfg.target_sparsity, prune_n=n_m[0], prune_m=n_m[1])
                else:
                    mask = magnitude_mask(W, sparsity=cfg.target_sparsity, prune_n=n_m[0], prune_m=n_m[1])
                new_weights.append(W.to(PRECISION) * ~mask.to(W.device))
        seconds = (time.perf_counter() - t0) / len(lins)
        for lin, W_new in zip(lins, new_weights, strict=True):
            self._finish(lin, W_new, group, seconds)

    def _weight(self, lin: nn.Linear) -> torch.Tensor:
        return self.masters.master(lin.weight).detach()

    def _finish(self, lin: nn.Linear, W_new: torch.Tensor, group: _Group, seconds: float) -> None:
        name = self.names[lin]
        t0 = time.perf_counter()
        W = self._weight(lin)
        entry: dict[str, Any] = {"shape": list(W.shape)}
        if group.H is not None:
            entry["rel_error"] = reconstruction_error(W, W_new, group.H)
        elif self.cfg.method != "magnitude":
            entry["pruned_by"] = "magnitude (not called during the calibration forward)"
        if self.cfg.method == "sparsegpt" and group.inv is not None and group.inv.retries:
            entry["dampening"] = group.inv.dampening
        W.copy_(W_new.to(device=W.device, dtype=W.dtype))
        if lin.weight.data_ptr() != W.data_ptr():  # the compute-dtype copy the rest of this layer's forward reads
            lin.weight.data.copy_(W_new.to(device=lin.weight.device, dtype=lin.weight.dtype))
        entry["sparsity"] = tensor_sparsity(W)  # no int64 copy of W (masks.count_zeros)
        entry["seconds"] = round(seconds + time.perf_counter() - t0, 4)
        self.report[name] = entry
        self.pruned.add(name)
        if self.bar is not None:
            self.bar.update(1, status=name)
