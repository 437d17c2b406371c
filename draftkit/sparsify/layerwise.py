"""The sparsify stage's per-layer form (registered in :mod:`draftkit.registry`): whether it streams, its memory
estimate, and the streamed run, which prunes one decoder layer at a time read from the shards and writes each as
it is done (:func:`draftkit.sparsify.runner.sparsify_with_tokens` on a
:class:`~draftkit.engine.StreamedLayers`). (Moved here from ``draftkit/streamed.py``.)
"""

from __future__ import annotations

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
from draftkit.modeling import text_config
from draftkit.sparsify.config import SparsifyConfig


def _estimator(config, cfg: SparsifyConfig, load, size: int, device):
    from draftkit.sparsify.calib import _auto_chunk_tokens

    calib = cfg.calib
    seqlen = min(calib.seqlen, getattr(text_config(config), "max_position_embeddings", None) or calib.seqlen)
    forward = cfg.method != "magnitude"
    return calibration_estimator(config, size=size, device=device, load=load,
                                 tokens=calib.samples * seqlen if forward else 0, seqlen=seqlen,
                                 chunk_tokens=cfg.chunk_tokens or _auto_chunk_tokens(config, seqlen, device),
                                 sparsegpt=cfg.method == "sparsegpt", forward=forward, sparsify=cfg.method)


def sparsify_layers(facts: CheckpointFacts, cfg: SparsifyConfig, load) -> Placement:
    """Stream or not and the memory estimate, before any weights load; raises when the run cannot fit."""
    model_name, config, device, can_stream, size = facts.name, facts.config, facts.device, facts.can_stream, facts.size
    streamed, estimate = choose_streaming(model_name, load.stream, _estimator(config, cfg, load, size, device),
                                          can_stream=can_stream, size=size, device=device)
    write = partial(placement.write_streamed, "sparsify", model_name, cfg, load=load, estimate=estimate,
                    work=partial(_sparsify, cfg))
    return Placement(streamed, estimate, write=write if streamed else None)


def recipe_estimate(hf_config, cfg: SparsifyConfig, load, size: int) -> int:
    """The bytes :func:`sparsify_layers` will estimate for a checkpoint of ``size`` bytes with ``hf_config``."""
    from draftkit.checkpoint import resolve_device

    device = resolve_device(load.device)
    return engine_estimate(_estimator(hf_config, cfg, load, size, device), load, size=size, device=device)


def _sparsify(cfg: SparsifyConfig, source, tmp: Path, tokenizer, config) -> dict[str, Any]:
    from draftkit.sparsify.runner import sparsify_with_tokens

    source.open_writer(tmp, list(range(len(source.layers))))
    _, report = sparsify_with_tokens(None, cfg, None, tokenizer=tokenizer, source=source)
    source.write_rest()
    return report
