"""The prune stage's per-layer form (registered in :mod:`draftkit.registry`): whether it streams, its memory
estimate, and the streamed run, which scores the blocks one decoder layer at a time from the shards
(:func:`draftkit.prune.runner.collect_layer_states` on a :class:`~draftkit.engine.StreamedLayers`) and copies the
kept layers' tensors under their new numbers. ``--drop`` and ``--method last`` run no forward: one tensor at a
time is copied. (Moved here from ``draftkit/streamed.py``.)
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any

from draftkit.checkpoint.facts import CheckpointFacts
from draftkit.engine import placement
from draftkit.engine.placement import (
    Placement,
    calibration_estimator,
    choose_streaming,
)
from draftkit.engine.placement import recipe_estimate as engine_estimate
from draftkit.memory import heavy_work_starts
from draftkit.modeling import text_config
from draftkit.prune.config import PruneConfig
from draftkit.prune.runner import needs_calibration


def _estimator(config, cfg: PruneConfig, load, size: int, device):
    calib = cfg.calib
    seqlen = min(calib.seqlen, getattr(text_config(config), "max_position_embeddings", None) or calib.seqlen)
    forward = needs_calibration(cfg)
    return calibration_estimator(config, size=size, device=device, load=load,
                                 tokens=calib.samples * seqlen if forward else 0, seqlen=seqlen,
                                 chunk_tokens=cfg.batch_size * seqlen, forward=forward)


def prune_layers(facts: CheckpointFacts, cfg: PruneConfig, load) -> Placement:
    """Stream or not and the memory estimate, before any weights load; raises when the run cannot fit."""
    model_name, config, device, can_stream, size = facts.name, facts.config, facts.device, facts.can_stream, facts.size
    streamed, estimate = choose_streaming(model_name, load.stream, _estimator(config, cfg, load, size, device),
                                          can_stream=can_stream, size=size, device=device,
                                          always=not needs_calibration(cfg))
    write = partial(placement.write_streamed, "prune", model_name, cfg, load=load, estimate=estimate, work=partial(_prune, cfg))
    return Placement(streamed, estimate, write=write if streamed else None)


def recipe_estimate(hf_config, cfg: PruneConfig, load, size: int) -> int:
    """The bytes :func:`prune_layers` will estimate for a checkpoint of ``size`` bytes with ``hf_config``."""
    from draftkit.checkpoint import resolve_device

    device = resolve_device(load.device)
    return engine_estimate(_estimator(hf_config, cfg, load, size, device), load, size=size, device=device,
                           always=not needs_calibration(cfg))


def _prune(cfg: PruneConfig, source, tmp: Path, tokenizer, config) -> dict[str, Any]:
    from draftkit.data import calibration_samples, model_max_length
    from draftkit.moe.prune import ExpertPruning
    from draftkit.moe.remove import set_expert_count
    from draftkit.moe.stream import rewrite_layer
    from draftkit.prune.drop import slice_config
    from draftkit.prune.runner import choose_blocks_and_experts, collect_layer_states

    t0 = time.perf_counter()
    ckpt = source.ckpt
    n_layers = len(source.layers)
    experts = ExpertPruning(source.model, cfg.experts, cfg.expert_method) if cfg.experts is not None else None
    max_len = model_max_length(source.model)
    samples = calibration_samples(tokenizer, cfg.calib, max_len=max_len) if needs_calibration(cfg) else None
    dropped, part = choose_blocks_and_experts(
        cfg, n_layers, samples, experts,
        lambda samples, hook: collect_layer_states(None, samples, batch_size=cfg.batch_size, source=source,
                                                   before_layer=hook),
    )
    keep = [i for i in range(n_layers) if i not in set(dropped)]
    heavy_work_starts()
    writer = source.open_writer(tmp, keep)
    pattern_keys = source.layer_keys()
    for old in keep:
        if experts is not None or source.reader is not source.ckpt:  # read, experts removed, written as stored
            rewrite_layer(source, old, experts)
            continue
        for k in pattern_keys.get(old, []):  # no forward: copy each kept layer's tensors under its new number
            source.copy(k, source.renamed(k))
    source.write_rest()
    report = {
        "stage": "prune", "method": part.pop("method"), "layers_before": n_layers, **part,
        "dropped_layers": dropped, "layers_after": len(keep),
        "params_before": sum(math.prod(s) for s in ckpt.shape.values()),
        "params_after": sum(math.prod(e[1]) for e in writer.spec.values()),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if experts is not None:
        report["experts"] = experts.finish(dropped)
        set_expert_count(config, report["experts"]["experts_after"])
    for c in {id(config): config, id(text_config(config)): text_config(config)}.values():
        slice_config(c, n_layers, set(dropped))
    return report
