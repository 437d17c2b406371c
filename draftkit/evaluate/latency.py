"""Measure the costs of the latency cost model (:mod:`draftkit.evaluate.cost`) on the device the models run on.

* ``c``: the draft's one-token decode forward over the target's one-token decode forward;
* ``v(n)``: the target's forward over ``n + 1`` tokens (the pending token and ``n`` proposals, as in a
  verification step) over its one-token forward, for n = 0..k_max.

Every forward appends to a KV cache that holds the prompt (minus its last token), as in decoding, and is cropped
back after each timing. The timings of all sizes are interleaved repeat by repeat, so a slow spell on a shared
machine touches every size alike; medians are kept. On CUDA the device is synchronised before every clock read.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from draftkit.evaluate.proposers import crop, forward, new_cache


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it measures the work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _timed_forward(model: nn.Module, ids: list[int], cache) -> float:
    device = _device(model)
    sync(device)
    t0 = time.perf_counter()
    forward(model, ids, cache)
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def measure_costs(draft: nn.Module, target: nn.Module, prompts: list[tuple[list[int], list[int]]], *,
                  k_max: int, repeats: int = 5) -> dict[str, Any]:
    """Time the forwards the cost model needs.

    Args:
        prompts: ``(target ids, draft ids)`` of each prompt (the same ids when the models share a tokenizer).
        k_max: the most proposals to time a verification of.
        repeats: timings of each size per prompt, after one untimed warm-up.

    Returns:
        ``{"target_forward_ms", "draft_forward_ms", "c", "v": [v(0)=1, v(1), ..., v(k_max)], "verify_ms": [...]}``.
    """
    verify: list[list[float]] = [[] for _ in range(k_max + 1)]
    drafted: list[float] = []
    for target_ids, draft_ids in prompts:
        t_cache, d_cache = new_cache(target), new_cache(draft)
        forward(target, target_ids[:-1], t_cache)
        forward(draft, draft_ids[:-1], d_cache)
        t_len, d_len = len(target_ids) - 1, len(draft_ids) - 1
        # the sizes feed real prompt tokens: what they are does not change a forward's time
        filler = (target_ids * (k_max + 1))[: k_max + 1]
        for r in range(repeats + 1):
            for n in range(k_max + 1):
                seconds = _timed_forward(target, filler[: n + 1], t_cache)
                crop(t_cache, t_len)
                if r:
                    verify[n].append(seconds)
            seconds = _timed_forward(draft, draft_ids[-1:], d_cache)
            crop(d_cache, d_len)
            if r:
                drafted.append(seconds)
    verify_ms = [1000 * statistics.median(t) for t in verify]
    draft_ms = 1000 * statistics.median(drafted)
    return {
        "target_forward_ms": verify_ms[0],
        "draft_forward_ms": draft_ms,
        "c": draft_ms / verify_ms[0],
        "v": [ms / verify_ms[0] for ms in verify_ms],
        "verify_ms": verify_ms,
        "cost_prompts": len(prompts),
        "cost_repeats": repeats,
    }
