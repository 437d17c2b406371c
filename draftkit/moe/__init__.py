"""Mixture-of-experts support in one place: architecture adapters (router, experts, top_k, grouped routing,
shared experts), per-expert linears for the layer-wise engine, expert saliency (REAP, frequency, EAN) and
expert removal. The stages only call into this package."""

from draftkit.moe.arch import MoeBlock, find_moe_blocks, is_moe, moe_blocks, router_modules
from draftkit.moe.experts import ExpertLinear, expert_linears, instrument
from draftkit.moe.prune import ExpertPruning, experts_to_drop
from draftkit.moe.remove import remove_experts, set_expert_count
from draftkit.moe.report import moe_sparsity_report
from draftkit.moe.saliency import SaliencyStats, experts_to_keep, saliency

__all__ = [
    "ExpertLinear",
    "ExpertPruning",
    "SaliencyStats",
    "experts_to_drop",
    "experts_to_keep",
    "instrument",
    "remove_experts",
    "saliency",
    "set_expert_count",
    "MoeBlock",
    "expert_linears",
    "find_moe_blocks",
    "is_moe",
    "moe_blocks",
    "moe_sparsity_report",
    "router_modules",
]
