"""Expert pruning inside the prune stage's layer-wise pass (orchestration; the maths is in :mod:`saliency`).

For each decoder layer, before its outputs are computed for the next one: the layer runs over every
calibration batch with the eager per-expert loop, whose observer accumulates each expert's saliency from
the tokens routed to it; the lowest-saliency experts are removed from the layer; then the pass computes
the layer's outputs with the experts that are left (as llm-compressor's sequential pipeline does), so
the next layer's routing and saliency see the pruned layer. The config's expert count is written once
at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from draftkit.errors import InvalidInputError, UnsupportedModelError
from draftkit.modeling import decoder_layers, text_config
from draftkit.moe.arch import EXPERT_COUNT_KEYS, TOP_K_KEYS, find_moe_blocks
from draftkit.moe.experts import instrument, supported
from draftkit.moe.remove import remove_experts, set_expert_count
from draftkit.moe.saliency import SaliencyStats, experts_to_keep, saliency


def _count(tc, keys) -> int | None:
    for k in keys:
        v = getattr(tc, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def experts_to_drop(hf_config, spec: float) -> int:
    """How many routed experts ``--experts spec`` removes from each MoE layer, checked against the config
    before any weights load: at least one, ``top_k`` still reachable, equal groups under grouped routing.

    Raises:
        InvalidInputError: the model has no routed experts, or the count does not fit it.
    """
    tc = text_config(hf_config)
    E = _count(tc, EXPERT_COUNT_KEYS)
    if E is None:
        raise InvalidInputError(f"--experts {spec:g}: this model ({getattr(tc, 'model_type', '?')}) has no routed "
                                "experts; --experts applies to mixture-of-experts models")
    if spec >= 1 and spec != int(spec):
        raise InvalidInputError(f"--experts {spec:g}: give a fraction in (0, 1) or a whole number of experts")
    n_drop = int(spec) if spec >= 1 else int(E * spec + 1e-9)
    if not 1 <= n_drop < E:
        raise InvalidInputError(f"--experts {spec:g} removes {n_drop} of the {E} experts of each MoE layer; "
                                f"give a fraction or count that removes between 1 and {E - 1}")
    top_k = _count(tc, TOP_K_KEYS) or 1
    n_group, topk_group = getattr(tc, "n_group", None), getattr(tc, "topk_group", None)
    if isinstance(n_group, int) and n_group > 1:
        if n_drop % n_group:
            raise InvalidInputError(f"--experts {spec:g} removes {n_drop} experts but this model routes within "
                                    f"n_group={n_group} groups, which must stay equal: remove a multiple of {n_group}")
        available = (topk_group or n_group) * ((E - n_drop) // n_group)
    else:
        available = E - n_drop
    if top_k > available:
        raise InvalidInputError(f"--experts {spec:g}: the router picks top_k={top_k} experts per token but only "
                                f"{available} would be left to pick from; remove fewer experts")
    return n_drop


class ExpertPruning:
    """Saliency, choice and removal of experts, one decoder layer at a time (:meth:`before_layer`)."""

    def __init__(self, model: nn.Module, spec: float, method: str):
        self.model = model
        self.method = method
        self.n_drop = experts_to_drop(model.config, spec)
        self.experts_before = _count(text_config(model), EXPERT_COUNT_KEYS)
        layers = decoder_layers(model)
        self.prefix = next(n for n, m in model.named_modules() if m is layers)
        self.layers: dict[str, dict[str, Any]] = {}
        self.ran = False

    def before_layer(self, i: int, layer: nn.Module, run_all: Callable[[], object], masters=None) -> None:
        """Score the experts of layer ``i`` on every calibration batch (``run_all``), then remove the lowest.

        ``masters`` (:class:`draftkit.compute.Masters`) holds the stored-dtype weights while the layer runs in
        the compute dtype: the experts are removed from those (exact), and the layer is cast again."""
        self.ran = True
        blocks = find_moe_blocks(layer, text_config(self.model))
        if not blocks:
            return
        for b in blocks:
            if not supported(b):
                raise UnsupportedModelError(f"{self.prefix}.{i}.{b.name}: expert pruning needs fused 3-D expert "
                                            f"parameters ({type(b.experts).__name__} has another layout)")
        stats = {id(b.module): SaliencyStats(b.num_experts) for b in blocks}

        def observe(block, j, token_idx, g, f) -> None:
            stats[id(block.module)].update(j, g, f)

        with instrument(blocks, [observe]):
            run_all()
        if masters is not None:
            masters.restore(layer)
        for b in blocks:
            st = stats[id(b.module)]
            S = saliency(st, self.method)
            keep = experts_to_keep(S, self.n_drop, b.n_group if (b.n_group or 0) > 1 else None)
            remove_experts(b, keep)
            self.layers[f"{self.prefix}.{i}.{b.name}"] = {
                "kept": keep,
                "saliency": [round(float(s), 6) for s in S],
                "tokens": [int(c) for c in st.count],
            }
        if masters is not None:
            masters.cast(layer)

    def finish(self, dropped_layers: list[int]) -> dict[str, Any]:
        """Write the new expert count into the config; the report (kept experts and saliency per layer)."""
        after = (self.experts_before or 0) - self.n_drop
        keys = set_expert_count(self.model.config, after)
        if not self.layers:
            raise UnsupportedModelError("--experts: no MoE layer with routed experts was found in the model")
        return {
            "method": self.method,
            "removed_per_layer": self.n_drop,
            "experts_before": self.experts_before,
            "experts_after": after,
            "config_keys": sorted(set(keys)),
            "layers": {n: v for n, v in self.layers.items()
                       if int(n[len(self.prefix) + 1:].split(".")[0]) not in set(dropped_layers)},
        }
