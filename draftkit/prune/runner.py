"""The prune stage: score blocks on calibration data in one forward pass, drop the chosen ones."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from draftkit.data import calibration_samples, model_max_length
from draftkit.engine.forward import through_layers
from draftkit.engine.layers import ResidentLayers
from draftkit.errors import InvalidInputError
from draftkit.modeling import count_parameters, decoder_layers, text_config
from draftkit.moe.prune import ExpertPruning, experts_to_drop
from draftkit.prune.config import PruneConfig
from draftkit.prune.drop import drop_layers
from draftkit.prune.scores import block_distances, choose_block, lowest_influence, parse_layer_ranges


@torch.no_grad()
def collect_layer_states(model: nn.Module | None, samples: list[torch.Tensor], *, batch_size: int = 4, source=None,
                         before_layer=None):
    """Run the calibration set once through the decoder, layer by layer, and record per layer boundary
    what scoring needs.

    The first layer's inputs (and every layer's other arguments) are captured per batch, then each
    layer runs over all batches before the next: with a streamed ``source`` only one layer is in memory.

    Returns:
        ``before_layer(i, layer, run_all, masters)`` (expert pruning) may edit each layer before its outputs
        are computed (its stored-dtype weights: ``masters``).

        ``(last_token_states, block_influence)``: ``[samples, L + 1, hidden]`` float32 hidden states of the
        last token entering each layer plus the one leaving the last layer (before the final norm, which
        HF's ``output_hidden_states`` would have applied), and the ``[L]`` Block Influence of each layer
        averaged over every token.
    """
    source = source or ResidentLayers(model)
    n = len(source.layers)
    # Batches of equal-length sequences, so the last position is the last real token (no padding).
    by_len: dict[int, list[torch.Tensor]] = {}
    for s in samples:
        by_len.setdefault(len(s), []).append(s)
    batches = [torch.stack(g[i : i + batch_size]) for g in by_len.values() for i in range(0, len(g), batch_size)]
    cos_sum = torch.zeros(n, dtype=torch.float64)
    tok_count = sum(b.numel() for b in batches)
    last: list[list[torch.Tensor]] = [[] for _ in batches]  # per batch: the state entering each layer, then leaving

    def score(i: int, c: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        x_in = x_in.to(x_out.device)  # activations may wait on the CPU while layers run on the GPU
        cos_sum[i] += nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1).double().sum().cpu()
        if i == 0:
            last[c].append(_last_token(x_in))
        last[c].append(_last_token(x_out))

    through_layers(source, batches, before=before_layer, after=score, desc="scoring blocks")
    states = torch.cat([torch.stack(per, dim=1) for per in last])
    bi = 1.0 - cos_sum / tok_count
    return states, bi.float()


def _last_token(h: torch.Tensor) -> torch.Tensor:
    """The last position's states as a float32 CPU tensor of their own: for a float32 CPU ``h``,
    ``.float().cpu()`` would be a view that keeps all of ``h`` (every token's states) alive."""
    return h.select(1, -1).to(device="cpu", dtype=torch.float32, copy=True)


def check_prune(hf_config, cfg: PruneConfig) -> None:
    """Check the settings against the model's config before any weights are loaded."""
    n_layers = getattr(text_config(hf_config), "num_hidden_layers", None)
    if n_layers is None:
        return
    if cfg.layers is not None and cfg.layers >= n_layers:
        raise InvalidInputError(f"--layers must be between 1 and {n_layers - 1} for this {n_layers}-layer model (got {cfg.layers})")
    if cfg.drop is not None:
        _explicit_layers(cfg.drop, n_layers)
    if cfg.experts is not None:
        experts_to_drop(hf_config, cfg.experts)


def _explicit_layers(spec: str, n_layers: int) -> list[int]:
    try:
        dropped = parse_layer_ranges(spec)
    except ValueError as exc:
        raise InvalidInputError(f"--drop {spec!r}: {exc}; write indices like 20-25 or 3,5,7-9") from None
    if not dropped or max(dropped) >= n_layers:
        raise InvalidInputError(f"--drop {spec!r}: the model has layers 0-{n_layers - 1}")
    if len(dropped) >= n_layers:
        raise InvalidInputError(f"--drop {spec!r} would remove all {n_layers} layers")
    return dropped


def needs_calibration(cfg: PruneConfig) -> bool:
    """Whether the run scores anything on calibration data: blocks (angular, bi) or experts."""
    return (cfg.drop is None and cfg.method != "last") or cfg.experts is not None


def choose_layers(cfg: PruneConfig, n_layers: int, samples: list[torch.Tensor] | None,
                  score) -> tuple[list[int], dict]:
    """Which blocks to drop, and the report entries that say why. ``score(samples)`` runs the
    calibration forward (:func:`collect_layer_states`) over the calibration ``samples``; it is called only by the
    scoring methods.

    Raises:
        InvalidInputError: the layer count or indices do not fit the model.
    """
    report: dict[str, Any] = {"method": cfg.method}
    if cfg.drop is not None:
        report["method"] = "explicit"
        return _explicit_layers(cfg.drop, n_layers), report
    n = cfg.layers
    if n is None or n < 1 or n >= n_layers:
        raise InvalidInputError(f"--layers must be between 1 and {n_layers - 1} for this {n_layers}-layer model (got {n})")
    if cfg.method == "last":
        start = n_layers - 1 - n
        return list(range(start, start + n)), report
    assert samples is not None, "a scoring method reads calibration samples (needs_calibration)"
    states, bi = score(samples)
    report["calibration"] = {"samples": len(samples), "tokens": int(sum(len(s) for s in samples))}
    report["block_influence"] = [round(float(v), 6) for v in bi]
    dist = block_distances(states, n)
    report["block_distances"] = [
        {"start": l, "end": l + n - 1, "distance": round(float(d), 6)} for l, d in enumerate(dist)
    ]
    if cfg.method == "angular":
        start = choose_block(dist)
        report["chosen_distance"] = round(float(dist[start]), 6)
        return list(range(start, start + n)), report
    return lowest_influence(bi, n), report


def choose_blocks_and_experts(cfg: PruneConfig, n_layers: int, samples: list[torch.Tensor] | None,
                              experts: ExpertPruning | None, collect) -> tuple[list[int], dict]:
    """:func:`choose_layers`, with the experts of each layer scored and removed in the same layer-wise pass
    (``collect(samples, before_layer)`` runs it, resident or streamed); a pass of its own when no block is
    scored. ``samples``: the calibration samples, read beforehand when :func:`needs_calibration`."""
    hook = experts.before_layer if experts is not None else None
    if cfg.layers is None and cfg.drop is None:
        dropped, part = [], {"method": None}
    else:
        dropped, part = choose_layers(cfg, n_layers, samples, lambda samples: collect(samples, hook))
    if experts is not None and not experts.ran:  # no block scoring pass to ride on: one of its own
        assert samples is not None
        collect(samples, hook)
        part["calibration"] = {"samples": len(samples), "tokens": int(sum(len(s) for s in samples))}
    return dropped, part


def prune_model(model: nn.Module, tokenizer, cfg: PruneConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Drop decoder blocks as ``cfg`` says. The model is edited in place and returned with a report.

    Raises:
        InvalidInputError: the layer count or indices do not fit the model.
    """
    t0 = time.perf_counter()
    n_layers = len(decoder_layers(model))
    params_before = count_parameters(model)
    samples = calibration_samples(tokenizer, cfg.calib, max_len=model_max_length(model)) if needs_calibration(cfg) else None
    experts = ExpertPruning(model, cfg.experts, cfg.expert_method) if cfg.experts is not None else None
    dropped, part = choose_blocks_and_experts(cfg, n_layers, samples, experts,
                                              lambda samples, hook: collect_layer_states(
                                                  model, samples, batch_size=cfg.batch_size, before_layer=hook))
    report: dict[str, Any] = {"stage": "prune", "method": part.pop("method"), "layers_before": n_layers, **part}
    drop_layers(model, dropped)
    if experts is not None:
        report["experts"] = experts.finish(dropped)
    report.update(
        dropped_layers=dropped,
        layers_after=len(decoder_layers(model)),
        params_before=params_before,
        params_after=count_parameters(model),
        seconds=round(time.perf_counter() - t0, 3),
    )
    return model, report
