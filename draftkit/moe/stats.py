"""What an MoE model holds and computes per token: experts per layer, active parameters, expert MACs, and the
fused expert weights as named tensors (for sparsity masks, reports and exports)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from draftkit.moe.arch import moe_blocks


def expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fused routed-expert weight parameters (3-D, experts on dim 0) by full parameter name
    (``model.layers.0.mlp.experts.gate_up_proj``); empty for a dense model or per-expert linears."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for per_layer in moe_blocks(model).values():
        for b in per_layer:
            if not b.fused:
                continue
            for p in b.expert_params:
                w = getattr(b.experts, p)
                if w.dim() == 3:
                    out[f"{names[id(b.experts)]}.{p}"] = w
    return out


def _per_expert_params(block) -> int:
    if block.fused:
        return sum(getattr(block.experts, p).numel() for p in block.expert_params) // block.num_experts
    return sum(p.numel() for p in block.experts[0].parameters())


def expert_summary(model: nn.Module) -> dict[str, Any] | None:
    """Routed experts per decoder layer (0 for a dense layer), experts per token, and the parameters one
    token uses: everything but the routed experts it is not sent to (``top_k`` of each MoE layer's experts)."""
    blocks = moe_blocks(model)
    if not blocks:
        return None
    from draftkit.modeling import count_parameters, decoder_layers

    n_layers = len(decoder_layers(model))
    routed = active = 0
    for per_layer in blocks.values():
        for b in per_layer:
            per = _per_expert_params(b)
            routed += per * b.num_experts
            active += per * min(b.top_k, b.num_experts)
    first = next(iter(blocks.values()))[0]
    return {
        "experts_per_layer": [sum(b.num_experts for b in blocks.get(i, [])) for i in range(n_layers)],
        "top_k": first.top_k,
        "shared_experts": bool(first.shared),
        "routed_expert_parameters": routed,
        "active_parameters_per_token": count_parameters(model) - routed + active,
    }


def expert_macs_per_token(model: nn.Module, *, nonzero: bool = False) -> int:
    """Multiply-accumulates of the routed experts and routers for one token: ``top_k`` experts of each MoE
    layer (their mean non-zero weights with ``nonzero``: tokens spread over the experts) plus the router's
    ``E x hidden``. Per-expert linears are nn.Linear modules, which the caller counts itself; only their
    share beyond ``top_k`` is taken off here."""
    total = 0
    for per_layer in moe_blocks(model).values():
        for b in per_layer:
            E, k = b.num_experts, min(b.top_k, b.num_experts)
            router = getattr(b.router, "weight")  # noqa: B009 - a Parameter of a module typed as nn.Module
            if not isinstance(b.router, nn.Linear):
                total += int(torch.count_nonzero(router)) if nonzero else int(router.numel())
            if b.fused:
                weights = [getattr(b.experts, p) for p in b.expert_params if getattr(b.experts, p).dim() == 3]
                all_w = sum(int(torch.count_nonzero(w)) if nonzero else w.numel() for w in weights)
                total += all_w * k // E
            else:  # counted as nn.Linear modules by the caller: remove the experts a token does not visit
                lins = [m for m in b.experts.modules() if isinstance(m, nn.Linear)]
                all_w = sum(int(torch.count_nonzero(m.weight)) if nonzero else m.weight.numel() for m in lins)
                total -= all_w - all_w * k // E
    return total
