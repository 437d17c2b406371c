"""Each routed expert of a fused 3-D expert module as linears of its own, for the layer-wise engine.

:func:`expert_linears` gives every expert ``j`` two :class:`ExpertLinear` modules, ``experts.{j}.gate_up_proj``
and ``experts.{j}.down_proj``, whose ``weight`` is a view of row ``j`` of the fused parameter (the parameter
is looked up at each access, so a streamed layer loaded later is seen), and runs the experts with an
eager loop that calls them on the tokens routed to each expert. The layer-wise engine then treats
them like any other linear: its forward pre-hooks see the tokens routed to that expert (so its
Hessian or input norm is built from them), it prunes the weight in place through the view, and an
expert that no calibration token reaches is never called. An observer sees each expert's output
and routing weights (saliency for expert pruning).

Nothing is stored in the proxies: the model's ``state_dict`` is unchanged while they are installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from draftkit.moe.arch import MoeBlock, moe_blocks

# observer(block, j, token_idx, routing_weights [n], expert_output [n, H])
Observer = Callable[[MoeBlock, int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class ExpertLinear(nn.Linear):
    """Expert ``j``'s slice of one fused expert parameter, seen as an ``nn.Linear`` (``[out, in]``)."""

    def __init__(self, experts: nn.Module, param: str, j: int):
        nn.Module.__init__(self)
        self._owner = (experts,)  # a tuple: not registered as a submodule (no cycle in the module tree)
        self._param = param
        self.j = j
        self.transposed = bool(getattr(experts, "is_transposed", False))
        self.out_features, self.in_features = self.weight.shape

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        w = getattr(self._owner[0], self._param)[self.j]
        return w.T if self.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        b = getattr(self._owner[0], f"{self._param}_bias", None)
        return None if b is None else b[self.j]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"expert={self.j}, {self._param}, in_features={self.in_features}, out_features={self.out_features}"


class _Expert(nn.Module):
    """Holds expert ``j``'s two proxies under the fused parameters' names."""

    def __init__(self, experts: nn.Module, j: int, up: str):
        super().__init__()
        self.add_module(up, ExpertLinear(experts, up, j))
        self.add_module("down_proj", ExpertLinear(experts, "down_proj", j))


def _up_name(experts: nn.Module) -> str | None:
    for name in ("gate_up_proj", "up_proj"):
        p = getattr(experts, name, None)
        if isinstance(p, torch.Tensor) and p.dim() == 3:
            return name
    return None


def supported(block: MoeBlock) -> bool:
    """Fused experts the eager loop computes exactly as transformers does (no post-expert norm)."""
    ex = block.experts
    return (block.fused and _up_name(ex) is not None and isinstance(getattr(ex, "down_proj", None), torch.Tensor)
            and not getattr(ex, "has_post_expert_norm", False))


def _eager_forward(block: MoeBlock, proxies: list[_Expert], up: str, observers: list[Observer]):
    ex: Any = block.experts  # transformers' experts class: act_fn, _apply_gate
    has_gate = bool(getattr(ex, "has_gate", up == "gate_up_proj"))

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        hit = torch.unique(top_k_index).tolist()
        for j in hit:
            if not 0 <= j < len(proxies):
                continue
            top_k_pos, token_idx = torch.where(top_k_index.T == j)  # ordered as transformers' eager loop
            h = getattr(proxies[j], up)(hidden_states[token_idx])
            if not has_gate:
                h = ex.act_fn(h)
            elif hasattr(ex, "_apply_gate"):
                h = ex._apply_gate(h)
            else:
                gate, up_h = h.chunk(2, dim=-1)
                h = ex.act_fn(gate) * up_h
            y = proxies[j].get_submodule("down_proj")(h)
            g = top_k_weights[token_idx, top_k_pos]
            for obs in observers:
                obs(block, j, token_idx, g, y)
            out.index_add_(0, token_idx, (y * g[:, None]).to(out.dtype))
        return out

    return forward


@contextlib.contextmanager
def expert_linears(model: nn.Module, observers: list[Observer] | None = None) -> Iterator[dict[int, list[MoeBlock]]]:
    """Install the per-expert linears and the eager expert loop in every MoE layer of ``model``; undo on exit.

    Yields the MoE blocks by layer index. Blocks the loop cannot compute (see :func:`supported`) are left
    as they are, so their experts stay invisible to the layer-wise engine.
    """
    blocks = moe_blocks(model)
    with instrument([b for per_layer in blocks.values() for b in per_layer], observers or []):
        yield blocks


@contextlib.contextmanager
def instrument(blocks: list[MoeBlock], observers: list[Observer]) -> Iterator[None]:
    """:func:`expert_linears` for the given MoE blocks (the supported ones); undone on exit."""
    installed: list[tuple[nn.Module, list[str], Any]] = []
    try:
        for block in blocks:
            if not supported(block):
                continue
            ex = block.experts
            up = _up_name(ex)
            assert up is not None
            proxies = [_Expert(ex, j, up) for j in range(block.num_experts)]
            names = [str(j) for j in range(len(proxies))]
            for n, p in zip(names, proxies, strict=True):
                ex.add_module(n, p)
            installed.append((ex, names, ex.__dict__.get("forward")))
            ex.forward = _eager_forward(block, proxies, up, observers)
        yield
    finally:
        for ex, names, forward in installed:
            for n in names:
                del ex._modules[n]
            if forward is None:
                del ex.forward
            else:
                ex.forward = forward
