"""The sparsify stage's per-layer function on the layer-wise engine (:func:`draftkit.engine.forward.through_layers`,
which reads each decoder layer, resident or from the shards, runs the calibration chunks through it and writes it
out): one decoder layer at a time, linears in execution order.

1. Capture (the engine): every decoder layer is temporarily replaced by a stub that records all the positional and
   keyword arguments it receives (position embeddings, its own attention mask — sliding-window layers get
   a different one —, position ids, cache positions...) and passes the hidden states through; one cheap
   model forward per chunk of calibration tokens records the first layer's input and every layer's
   arguments, without running any layer.
2. Per layer, one forward over the calibration tokens with a forward pre-hook on each targeted linear.
   When a linear is called, the input it receives is the one the *already pruned* earlier linears of this
   layer produce (GPTQ's "true sequential" order): the hook accumulates H = 2/n Σ x xᵀ from that input,
   factors H⁻¹ once, prunes the linear, and lets the forward continue with the pruned weight. Linears
   called with the very same input tensor (q/k/v; gate/up) reuse that Hessian and factor. The layer's
   output is the next layer's input: each layer runs once.
3. With several chunks of tokens (``chunk_tokens``, by default a few thousand tokens each), every chunk's
   forward runs once too, suspended at each group of linears until the group is pruned from the inputs of
   all chunks (:mod:`draftkit.sparsify.interleaved`): a layer's transient activations exist for one chunk
   at a time, and nothing is recomputed.

Only one layer's activations and one Hessian are alive at a time. The forwards run in the compute dtype
(:mod:`draftkit.compute`; the layer source casts each layer and keeps its master weights); the maths is
float32: the Hessian accumulates float32 products of the (bf16) inputs, and SparseGPT prunes float32
copies of the master weights, which get the result in their stored dtype.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from draftkit import console
from draftkit.engine.forward import through_layers
from draftkit.engine.layers import ResidentLayers
from draftkit.errors import InvalidInputError
from draftkit.modeling import count_parameters
from draftkit.moe import expert_linears, moe_sparsity_report
from draftkit.sparsify.calib import calibration_chunks, check_sparsify
from draftkit.sparsify.config import SparsifyConfig
from draftkit.sparsify.interleaved import prune_layer_interleaved
from draftkit.sparsify.masks import count_zeros, target_linears
from draftkit.sparsify.pruner import LayerPruner, _Group
from draftkit.sparsify.sparsegpt import accumulate_hessian, make_empty_hessian


@torch.no_grad()
def prune_layer_single_pass(layer, targets: dict[str, nn.Linear], pruner: LayerPruner, run) -> list[torch.Tensor]:
    """All calibration tokens in one forward (``run()``, the engine's forward of the one chunk): prune each linear
    inside it, in execution order.

    When an earlier layer showed which linears read the same input, the first of them to be called
    prunes the whole group at once; the others are then checked to really receive that input.
    """
    state: dict[str, Any] = {"group": None, "groups": []}
    by_relative = {pruner.relative.get(lin, name): lin for name, lin in targets.items()}

    def hook(module, inputs):
        name = pruner.names[module]
        x = inputs[0]
        group = state["group"]
        if name in pruner.pruned:
            if group is None or group.x is not x:
                raise RuntimeError(f"{name} was pruned with its siblings' Hessian but reads another input")
            return None
        if group is None or group.x is not x:
            group = _Group(x=x)
            group.H, group.tokens = accumulate_hessian(
                make_empty_hessian(x.shape[-1], device=module.weight.device), x, 0
            )
            state["group"] = group  # the previous group's Hessian is freed here
            state["groups"].append([])
        rel = pruner.relative.get(module, name)
        members = [module] + [
            by_relative[r] for r in pruner.siblings.get(rel, ())
            if r != rel and r in by_relative and pruner.names[by_relative[r]] not in pruner.pruned
        ]
        group.members.extend(pruner.names[m] for m in members)
        state["groups"][-1].extend(members)
        pruner.prune_group(members, group)
        return None

    handles = [lin.register_forward_pre_hook(hook) for lin in targets.values()]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
        state["group"] = None
    for members in state["groups"]:
        pruner.learn_group(members)
    return [out]


def sparsify_model(model: nn.Module, tokenizer, cfg: SparsifyConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Sparsify the decoder linears of ``model`` in place as ``cfg`` says; return it with a report.

    Raises:
        InvalidInputError: ``targets``/``ignore`` match no linear, or N:M does not fit a targeted width.
        DataError: the calibration data is unusable.
    """
    return sparsify_with_tokens(model, cfg, None, tokenizer=tokenizer)


def sparsify_with_tokens(
    model: nn.Module | None, cfg: SparsifyConfig, chunks: list[torch.Tensor] | None, *, tokenizer=None, source=None
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`sparsify_model` on given calibration token chunks (``[batch, seqlen]`` LongTensors), or on
    ``cfg.calib`` read with ``tokenizer`` when ``chunks`` is None.

    ``source`` gives the decoder layers one at a time (:mod:`draftkit.engine.layers`): resident in ``model``
    by default, or streamed from the checkpoint's shards and written out as each is done. The routed
    experts of an MoE model are linears of their own meanwhile (:func:`draftkit.moe.expert_linears`).
    """
    source = source or ResidentLayers(model)
    with expert_linears(source.model):
        model, report = _sparsify_with_tokens(cfg, chunks, tokenizer, source)
    report.update(moe_sparsity_report(model, report))
    return model, report


def _sparsify_with_tokens(cfg: SparsifyConfig, chunks, tokenizer, source) -> tuple[nn.Module, dict[str, Any]]:
    t0 = time.perf_counter()
    model = source.model
    targets = target_linears(model, cfg.targets, cfg.ignore)
    if not targets:
        raise InvalidInputError(
            f"--targets {cfg.targets!r} / --ignore {cfg.ignore!r} match no linear layer inside the decoder layers"
        )
    nm = cfg.nm
    if nm is not None:
        bad = [n for n, lin in targets.items() if lin.in_features % nm[1]]
        if bad:
            raise InvalidInputError(
                f"pattern {cfg.pattern}: M={nm[1]} does not divide the input width of {bad[0]} "
                f"({targets[bad[0]].in_features}); choose another M or --ignore it"
            )
    sparsity = cfg.target_sparsity
    names = {lin: name for name, lin in targets.items()}
    modules_report: dict[str, Any] = {}
    report: dict[str, Any] = {"stage": "sparsify", "method": cfg.method, "pattern": cfg.pattern,
                              "target_sparsity": sparsity, "streamed": source.streamed}
    if source.masters.dtype is not None:
        report["compute_dtype"] = str(source.masters.dtype).removeprefix("torch.")
    layers = source.layers
    per_layer = [{n: lin for n, lin in targets.items() if any(lin is m for m in layer.modules())} for layer in layers]
    relative = {
        lin: rel for layer in layers for rel, lin in layer.named_modules() if isinstance(lin, nn.Linear) and lin in names
    }
    counted = {"zeros_before": 0}

    def prune_layer(i: int, layer: nn.Module, runs: list) -> list[torch.Tensor]:
        """Layer ``i``'s targets pruned inside the engine's forwards of its chunks (``runs``; none: magnitude)."""
        targets_i = per_layer[i]
        counted["zeros_before"] += sum(count_zeros(lin.weight) for lin in targets_i.values())
        if not runs:
            for lin in targets_i.values():
                pruner.prune(lin, _Group())
            return []
        if not targets_i:
            outs = [run() for run in runs]
        elif len(runs) == 1:
            outs = prune_layer_single_pass(layer, targets_i, pruner, runs[0])
        else:
            outs = prune_layer_interleaved(layer, targets_i, pruner, runs)
        for lin_name, lin in targets_i.items():
            if lin_name not in pruner.pruned:  # never called in a forward: fall back to magnitude
                console.warn(f"{lin_name} was not called during the calibration forward; pruned by magnitude")
                pruner.prune(lin, _Group())
        return outs

    with console.status_bar(f"sparsify ({cfg.method})", total=len(targets)) as bar:
        pruner = LayerPruner(cfg, names, modules_report, bar, relative, masters=source.masters)
        if cfg.method == "magnitude":
            report["calibration"] = None
        else:
            if chunks is None:
                chunks, report["calibration"] = calibration_chunks(model, tokenizer, cfg, source.device)
            else:
                report["calibration"] = {"samples": sum(len(c) for c in chunks), "seqlen": chunks[0].shape[1],
                                         "tokens": sum(c.numel() for c in chunks), "chunks": len(chunks)}
            report["passes_per_layer"] = 1
        # the engine reads each layer (resident or from the shards), runs the chunks, and writes it out
        through_layers(source, chunks if cfg.method != "magnitude" else None, forward=prune_layer, desc=None)
    zeros_before = counted["zeros_before"]

    total = sum(lin.weight.numel() for lin in targets.values())
    before = zeros_before / total
    if before >= sparsity and before > 0:
        console.warn(f"the targeted weights were already {before:.1%} sparse, more than the {sparsity:.1%} asked")
    after = sum(m["sparsity"] * math.prod(m["shape"]) for m in modules_report.values()) / total
    errors = [m["rel_error"] for m in modules_report.values() if "rel_error" in m]
    report.update(
        sparsity_before=before,
        modules=modules_report,
        sparsity=after,
        targeted_modules=len(targets),
        targeted_weights=total,
        targeted_share=round(total / count_parameters(model), 6),
        mean_rel_error=(sum(errors) / len(errors)) if errors else None,
        seconds=round(time.perf_counter() - t0, 3),
    )
    return model, report


__all__ = ["calibration_chunks", "check_sparsify", "sparsify_model", "sparsify_with_tokens"]
