"""Where an MoE decoder layer keeps its router, experts and shared experts (architecture adapters).

transformers 5 stores the routed experts of Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3 and most
other MoE models as one module with fused 3-D parameters (``gate_up_proj`` ``[E, 2I, H]`` and
``down_proj`` ``[E, H, I]``, flags such as ``is_transposed``/``has_bias`` set by
``use_experts_implementation``), beside a router module whose ``weight`` is ``[E, H]``. Older layouts
and remote code keep one MLP module per expert in an ``nn.ModuleList``; both are found here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from draftkit.modeling import decoder_layers

_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
_SHARED_GATE_NAMES = ("shared_expert_gate",)
# Config fields holding the routed-expert count, the experts per token, and grouped routing.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")


@dataclass
class MoeBlock:
    """One sparse MoE block of a decoder layer.

    Attributes:
        name: module name inside the decoder layer (``mlp``, ``block_sparse_moe``).
        module: the block; router: the module whose ``weight`` rows score the experts;
        experts: the routed experts (fused parameters, or an ``nn.ModuleList`` of MLPs);
        shared: names (inside the layer) of the shared experts and their gates, never removed.
    """

    name: str
    module: nn.Module
    router: nn.Module
    experts: nn.Module
    top_k: int
    n_group: int | None = None
    topk_group: int | None = None
    shared: list[str] = field(default_factory=list)

    @property
    def fused(self) -> bool:
        return not isinstance(self.experts, nn.ModuleList)

    @property
    def num_experts(self) -> int:
        return int(getattr(self.router, "weight").shape[0])  # noqa: B009 - a Parameter of a module typed as nn.Module

    @property
    def expert_params(self) -> list[str]:
        """Names of the fused expert parameters (every one has the experts on dim 0)."""
        E = self.num_experts
        return [n for n, p in self.experts.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == E]


def _top_k(block: nn.Module, router: nn.Module, config) -> int | None:
    for obj in (router, block):
        for key in ("top_k", "num_experts_per_tok"):
            v = getattr(obj, key, None)
            if isinstance(v, int):
                return v
    for key in TOP_K_KEYS:
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    return None


def find_moe_blocks(layer: nn.Module, config=None) -> list[MoeBlock]:
    """The MoE blocks of one decoder layer (none for a dense layer)."""
    out = []
    for name, module in layer.named_modules():
        experts = getattr(module, "experts", None)
        router = next((getattr(module, r) for r in _ROUTER_NAMES if isinstance(getattr(module, r, None), nn.Module)), None)
        if not isinstance(experts, nn.Module) or router is None:
            continue
        weight = getattr(router, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        E = weight.shape[0]
        if isinstance(experts, nn.ModuleList):
            if len(experts) != E:
                continue
        elif not any(p.dim() == 3 and p.shape[0] == E for p in experts.parameters(recurse=False)):
            continue
        cfg = config if config is not None else getattr(experts, "config", None)
        top_k = _top_k(module, router, cfg)
        if top_k is None:
            continue
        n_group = getattr(router, "num_group", None) or getattr(router, "n_group", None) or getattr(cfg, "n_group", None)
        topk_group = getattr(router, "topk_group", None) or getattr(cfg, "topk_group", None)
        shared = [f"{name}.{s}".lstrip(".") for s in _SHARED_NAMES + _SHARED_GATE_NAMES
                  if isinstance(getattr(module, s, None), nn.Module)]
        out.append(MoeBlock(name, module, router, experts, top_k, n_group, topk_group, shared))
    return out


def moe_blocks(model: nn.Module) -> dict[int, list[MoeBlock]]:
    """The MoE blocks of every decoder layer that has one, by layer index."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    found = {}
    for i, layer in enumerate(decoder_layers(model)):
        blocks = find_moe_blocks(layer, text)
        if blocks:
            found[i] = blocks
    return found


def moe_values_per_token(config) -> int:
    """Extra float values per token one MoE layer's forward holds (0 for a dense config): the router's ``E``
    scores, and per routed expert (``top_k``) the gathered input, its output and three expert-wide values.
    Every expert's Hessian in sparsify is at most ``max(hidden, expert width)`` wide, as a dense layer's is."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    E = next((getattr(tc, k) for k in EXPERT_COUNT_KEYS if isinstance(getattr(tc, k, None), int)), 0) or 0
    if E <= 0:
        return 0
    k = next((getattr(tc, key) for key in TOP_K_KEYS if isinstance(getattr(tc, key, None), int)), 1) or 1
    hidden = int(getattr(tc, "hidden_size", 0) or 0)
    width = int(getattr(tc, "moe_intermediate_size", None) or getattr(tc, "intermediate_size", 0) or 0)
    return int(E + k * (2 * hidden + 3 * width))


def moe_stream_bytes(config, dtype_bytes: int) -> int:
    """Extra host bytes while a streamed MoE layer is read (0 for a dense config): its largest fused expert
    parameter (``gate_up_proj``, ``E x 2I x H``) is built from the per-expert tensors on disk, which are held
    until it is whole (:mod:`draftkit.moe.stream`; measured: the read peaks at twice the fused tensor)."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    E = next((getattr(tc, k) for k in EXPERT_COUNT_KEYS if isinstance(getattr(tc, k, None), int)), 0) or 0
    if E <= 0:
        return 0
    hidden = int(getattr(tc, "hidden_size", 0) or 0)
    width = int(getattr(tc, "moe_intermediate_size", None) or getattr(tc, "intermediate_size", 0) or 0)
    return E * 2 * width * hidden * dtype_bytes


def moe_resident_bytes(config, dtype_bytes: int) -> int:
    """Extra host bytes while ``from_pretrained`` loads an MoE checkpoint whole (0 for a dense config): it reads
    the per-expert tensors of every layer before fusing them, so the routed expert weights (``E x 3 x I x H``
    per layer) are held twice (measured: ``benchmarks/results/moe_stream_memory.json``, resident row)."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(getattr(tc, "num_hidden_layers", 0) or 0)
    return layers * 3 * moe_stream_bytes(config, dtype_bytes) // 2


class MoeMemory(NamedTuple):
    """An MoE config's extra terms in the one memory estimate (all 0 for a dense config)."""

    values_per_token: int  # :func:`moe_values_per_token`
    stream_bytes: int  # :func:`moe_stream_bytes`
    resident_bytes: int  # :func:`moe_resident_bytes`


def moe_memory(config, dtype_bytes: int) -> MoeMemory:
    """The MoE terms of :func:`draftkit.memory.estimate_memory`, in one call."""
    return MoeMemory(moe_values_per_token(config), moe_stream_bytes(config, dtype_bytes),
                     moe_resident_bytes(config, dtype_bytes))


def is_moe(model: nn.Module) -> bool:
    return bool(moe_blocks(model))


def router_modules(layer: nn.Module) -> set[int]:
    """ids of the modules that route (the routers, shared-expert gates): never sparsified, never removed."""
    ids: set[int] = set()
    for block in find_moe_blocks(layer):
        ids.update(id(m) for m in block.router.modules())
        for s in _SHARED_GATE_NAMES:
            gate = getattr(block.module, s, None)
            if isinstance(gate, nn.Module):
                ids.update(id(m) for m in gate.modules())
    return ids
