"""Mixture-of-experts support in one place: architecture adapters (router, experts, top_k, grouped routing,
shared experts), per-expert linears for the layer-wise engine, expert saliency (REAP, frequency, EAN) and
expert removal. The stages only call into this package."""

from draftkit.moe.arch import MoeBlock, find_moe_blocks, is_moe, moe_blocks, router_modules
from draftkit.moe.experts import ExpertLinear, expert_linears
from draftkit.moe.report import moe_sparsity_report

__all__ = [
    "ExpertLinear",
    "MoeBlock",
    "expert_linears",
    "find_moe_blocks",
    "is_moe",
    "moe_blocks",
    "moe_sparsity_report",
    "router_modules",
]
