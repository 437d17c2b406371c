"""Does the draft pay off: the latency cost model's prediction beside the measured speedup, and the dynamic-k summary.

Orchestration only: the formulas are in :mod:`draftkit.evaluate.cost`, the timings in
:mod:`draftkit.evaluate.latency`, the engines in :mod:`draftkit.evaluate.engines`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from draftkit.evaluate.cost import best_k, break_even_cost, expected_tokens, predicted_speedup, step_cost
from draftkit.evaluate.latency import measure_costs

GAP = 0.15  # measured and predicted speedups further apart than this are printed side by side
COST_PROMPTS = 3  # prompts the forwards are timed on (each: one warm-up and COST_REPEATS timed repeats per size)
COST_REPEATS = 10  # medians of 30 timings per size: steady enough on a shared CPU


def cost_model(draft: nn.Module, target: nn.Module, prompts: list[tuple[list[int], list[int]]], *, k: int,
               alpha: list[float | None], steps: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Measure ``c`` and ``v(0..k)`` on the device, predict the speedup of every k from the acceptance by
    position ``alpha``; with ``steps`` (a dynamic-k run) also the prediction for those very steps."""
    costs = measure_costs(draft, target, prompts[:COST_PROMPTS], k_max=k, repeats=COST_REPEATS)
    c, v = costs["c"], costs["v"]
    by_k = predicted_speedup(alpha, c, v)
    out: dict[str, Any] = {**costs, "predicted_speedup_by_k": by_k}
    # the per-token draft cost at which each k breaks even, at the measured acceptance
    out["break_even_cost_by_k"] = [break_even_cost(expected_tokens([a or 0.0 for a in alpha[:j]], j), j, v[j])
                                   for j in range(1, len(by_k) + 1)]
    if by_k:
        kb, sb = best_k(by_k)
        out.update(best_k=kb, best_k_predicted_speedup=sb)
    if steps is not None:  # dynamic: each step's own length
        proposed = [p for p, _ in steps]
        committed = sum(1 + a for _, a in steps)
        out["predicted_speedup"] = committed / sum(step_cost(p, c, v) for p in proposed) if steps else None
    elif len(by_k) >= k:
        out["predicted_speedup"] = by_k[k - 1]
        tokens = expected_tokens([a for a in alpha[:k] if a is not None], k)
        # the per-token draft cost at which this k breaks even, at the measured acceptance
        out["break_even_cost"] = break_even_cost(tokens, k, v[k])
    return out


def compare(measured: float | None, predicted: float | None) -> dict[str, Any]:
    """The measured speedup over the predicted one, and whether they differ by more than :data:`GAP`."""
    if not measured or not predicted:
        return {}
    ratio = measured / predicted
    return {"measured_over_predicted": ratio, "prediction_off": abs(ratio - 1) > GAP}


def dynamic_summary(controller, steps: list[tuple[int, int]]) -> dict[str, Any]:
    """What ``--k dynamic`` did: the bandit's pulls and rewards, tokens per target forward, wasted drafts."""
    proposed = sum(p for p, _ in steps)
    accepted = sum(a for _, a in steps)
    counts: dict[str, int] = {}
    for p, a in steps:
        counts[f"{p},{a}"] = counts.get(f"{p},{a}", 0) + 1
    return {
        "tapout": controller.summary(),
        "steps_by_proposed_accepted": counts,  # "n,a": how many steps proposed n and had a accepted
        "mean_proposed_per_step": proposed / len(steps) if steps else 0.0,
        "wasted_draft_tokens": proposed - accepted,
        "proposed_draft_tokens": proposed,
    }
