"""Remove routed experts from an MoE block in place: expert parameters, router rows, expert counts."""

from __future__ import annotations

import torch
from torch import nn

from draftkit.moe.arch import EXPERT_COUNT_KEYS, MoeBlock

_COUNT_ATTRS = (*EXPERT_COUNT_KEYS, "n_experts", "experts_per_rank")


@torch.no_grad()
def remove_experts(block: MoeBlock, keep: list[int]) -> None:
    """Keep only experts ``keep`` (ascending indices) of ``block``: slice every fused expert parameter (or the
    expert ``ModuleList``), the router's weight rows, its bias and score-correction bias, and update every
    expert count the modules hold. Shared experts are not touched."""
    E = block.num_experts
    idx = torch.tensor(keep, dtype=torch.long)
    if block.fused:
        ex = block.experts
        for name in block.expert_params:
            p = getattr(ex, name)
            setattr(ex, name, nn.Parameter(p.data[idx.to(p.device)].clone(), requires_grad=p.requires_grad))
        for name, buf in list(ex.named_buffers(recurse=False)):
            if buf is not None and buf.dim() >= 1 and buf.shape[0] == E:
                ex._buffers[name] = buf[idx.to(buf.device)].clone()
    else:
        old = block.experts
        assert isinstance(old, nn.ModuleList)
        experts = nn.ModuleList([old[j] for j in keep])
        for n, m in block.module.named_children():
            if m is block.experts:
                setattr(block.module, n, experts)
        block.experts = experts
    router = block.router
    for name, p in list(router.named_parameters(recurse=False)):
        if p.shape[0] == E:
            setattr(router, name, nn.Parameter(p.data[idx.to(p.device)].clone(), requires_grad=p.requires_grad))
    for name, buf in list(router.named_buffers(recurse=False)):
        if buf is not None and buf.dim() >= 1 and buf.shape[0] == E:
            router._buffers[name] = buf[idx.to(buf.device)].clone()
    if isinstance(getattr(router, "out_features", None), int):
        setattr(router, "out_features", len(keep))  # noqa: B010 - an nn.Linear router's attribute
    for holder in (block.module, router, block.experts):
        for key in _COUNT_ATTRS:
            if getattr(holder, key, None) == E:
                setattr(holder, key, len(keep))


def set_expert_count(config, n: int) -> list[str]:
    """Write the new routed-expert count into every config field that holds it; returns their names."""
    changed = []
    configs = {id(config): config}
    if hasattr(config, "get_text_config"):
        tc = config.get_text_config()
        configs[id(tc)] = tc
    for cfg in configs.values():
        for key in EXPERT_COUNT_KEYS:
            v = getattr(cfg, key, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                setattr(cfg, key, n)
                changed.append(key)
    return changed
