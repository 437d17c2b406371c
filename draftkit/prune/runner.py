"""The prune stage: score blocks on calibration data in one forward pass, drop the chosen ones."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from draftkit.console import track
from draftkit.data import calibration_samples, model_max_length
from draftkit.errors import InvalidInputError
from draftkit.modeling import count_parameters, decoder, decoder_layers, text_config
from draftkit.prune.config import PruneConfig
from draftkit.prune.drop import drop_layers
from draftkit.prune.scores import block_distances, choose_block, lowest_influence, parse_layer_ranges


@torch.no_grad()
def collect_layer_states(model: nn.Module, samples: list[torch.Tensor], *, batch_size: int = 4):
    """Run the calibration set once through the decoder and record, per layer boundary, what scoring needs.

    Returns:
        ``(last_token_states, block_influence)``: ``[samples, L + 1, hidden]`` float32 hidden states of the
        last token entering each layer plus the one leaving the last layer (before the final norm, which
        HF's ``output_hidden_states`` would have applied), and the ``[L]`` Block Influence of each layer
        averaged over every token.
    """
    layers = decoder_layers(model)
    n = len(layers)
    device = next(model.parameters()).device
    last_states: list[torch.Tensor] = []
    cos_sum = torch.zeros(n, dtype=torch.float64)
    tok_count = 0
    current: dict[int, torch.Tensor] = {}

    def hook(idx):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, (tuple, list)) else output
            if idx == 0:
                current[0] = x_in[:, -1].float().cpu()
            current[idx + 1] = x_out[:, -1].float().cpu()
            cos = nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            cos_sum[idx] += cos.double().sum().cpu()

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    base = decoder(model)
    try:
        # Batches of equal-length sequences, so the last position is the last real token (no padding).
        by_len: dict[int, list[torch.Tensor]] = {}
        for s in samples:
            by_len.setdefault(len(s), []).append(s)
        batches = [group[i : i + batch_size] for group in by_len.values() for i in range(0, len(group), batch_size)]
        for batch in track(batches, "scoring blocks"):
            ids = torch.stack(batch).to(device)
            base(input_ids=ids, use_cache=False)
            last_states.append(torch.stack([current[i] for i in range(n + 1)], dim=1))
            tok_count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    states = torch.cat(last_states)
    bi = 1.0 - cos_sum / tok_count
    return states, bi.float()


def check_prune(hf_config, cfg: PruneConfig) -> None:
    """Check the settings against the model's config before any weights are loaded."""
    n_layers = getattr(text_config(hf_config), "num_hidden_layers", None)
    if n_layers is None:
        return
    if cfg.layers is not None and cfg.layers >= n_layers:
        raise InvalidInputError(f"--layers must be between 1 and {n_layers - 1} for this {n_layers}-layer model (got {cfg.layers})")
    if cfg.drop is not None:
        _explicit_layers(cfg.drop, n_layers)


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


def prune_model(model: nn.Module, tokenizer, cfg: PruneConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Drop decoder blocks as ``cfg`` says. The model is edited in place and returned with a report.

    Raises:
        InvalidInputError: the layer count or indices do not fit the model.
    """
    t0 = time.perf_counter()
    n_layers = len(decoder_layers(model))
    params_before = count_parameters(model)
    report: dict[str, Any] = {"stage": "prune", "method": cfg.method, "layers_before": n_layers}

    if cfg.drop is not None:
        dropped = _explicit_layers(cfg.drop, n_layers)
        report["method"] = "explicit"
    else:
        n = cfg.layers
        if n is None or n < 1 or n >= n_layers:
            raise InvalidInputError(f"--layers must be between 1 and {n_layers - 1} for this {n_layers}-layer model (got {n})")
        if cfg.method == "last":
            start = n_layers - 1 - n
            dropped = list(range(start, start + n))
        else:
            samples = calibration_samples(tokenizer, cfg.calib, max_len=model_max_length(model))
            states, bi = collect_layer_states(model, samples, batch_size=cfg.batch_size)
            report["calibration"] = {"samples": len(samples), "tokens": int(sum(len(s) for s in samples))}
            report["block_influence"] = [round(float(v), 6) for v in bi]
            dist = block_distances(states, n)
            report["block_distances"] = [
                {"start": l, "end": l + n - 1, "distance": round(float(d), 6)} for l, d in enumerate(dist)
            ]
            if cfg.method == "angular":
                start = choose_block(dist)
                dropped = list(range(start, start + n))
                report["chosen_distance"] = round(float(dist[start]), 6)
            else:
                dropped = lowest_influence(bi, n)

    drop_layers(model, dropped)
    report.update(
        dropped_layers=dropped,
        layers_after=len(decoder_layers(model)),
        params_before=params_before,
        params_after=count_parameters(model),
        seconds=round(time.perf_counter() - t0, 3),
    )
    return model, report
