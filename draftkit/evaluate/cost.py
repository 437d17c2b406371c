"""The cost model of speculative decoding: MACs per token and the expected speedup from MAL.

Expected speedup (Leviathan et al. 2023, sec. 3.4, with the measured MAL in place of the closed form):
``MAL / (k * c + 1)`` where ``c`` is the draft/target cost ratio per token. Here ``c`` comes from MACs, so a
model drafting for itself has ``c = 1`` and an expected speedup of exactly ``(k + 1) / (k + 1) = 1``.

The latency cost model below takes ``c`` and the target's verification cost ``v(k)`` as measured on the device
(:mod:`draftkit.evaluate.latency`) and predicts the speedup of every k from the acceptance by position.
"""

from __future__ import annotations

import torch
from torch import nn

from draftkit.moe.stats import expert_macs_per_token


def macs_per_token(model: nn.Module, context: int, *, nonzero: bool = False) -> int:
    """Multiply-accumulates of one token's forward: every linear (lm_head included) plus attention
    scores and values over ``context`` positions (from the config). ``nonzero`` counts only the non-zero
    weights of the linears (what a sparse kernel could skip); by default every weight counts (dense)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if nonzero:
        linear = sum(int(torch.count_nonzero(m.weight)) for m in linears)
    else:
        linear = sum(m.in_features * m.out_features for m in linears)
    linear += expert_macs_per_token(model, nonzero=nonzero)  # MoE: top_k routed experts per token, and routers
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    return int(linear + 2 * layers * heads * head_dim * context)


def expected_speedup(mal: float, k: int, cost_ratio: float) -> float:
    """``MAL / (k * c + 1)``: target-forward time saved per committed token, drafts costing ``c`` each."""
    return mal / (k * cost_ratio + 1)


# --------------------------------------------------------------------------------------------
# The latency cost model: costs measured on the device (draftkit.evaluate.latency), not counted in MACs
# --------------------------------------------------------------------------------------------
#
# One step of speculative decoding with n proposals costs n draft forwards (c each, in target one-token
# forwards) and one target forward over the pending token and the n proposals, v(n) target one-token forwards
# (v(0) = 1; v(n) ~ 1 while the target is memory-bound, as on a GPU; on a CPU it grows with n). It commits
# 1 + accepted tokens. With alpha_i the measured fraction of steps that accepted positions 1..i (the report's
# acceptance_by_position), a fixed k commits E(k) = 1 + sum_{i<=k} alpha_i tokens per step on average and
#
#     S(k) = E(k) / (k * c + v(k))
#
# is its speedup over the target alone (Leviathan et al. 2023, sec. 3.4, with v(k) measured where the paper
# takes 1, and the measured alpha_i where the paper assumes a constant acceptance rate).


def expected_tokens(alpha: list[float], k: int) -> float:
    """``E(k) = 1 + sum_{i<=k} alpha_i``: tokens one step of ``k`` proposals commits on average."""
    return 1.0 + sum(alpha[:k])


def step_cost(n: int, c: float, v: list[float]) -> float:
    """``n * c + v(n)``: one step's time in target one-token forwards (``v[n]``: verifying n proposals)."""
    return n * c + v[n]


def predicted_speedup(alpha: list[float | None], c: float, v: list[float]) -> list[float]:
    """``S(k)`` for k = 1, 2, ... as far as both the acceptance (``alpha``) and the verification costs
    (``v[0..k]``) were measured; a position never proposed (None) ends the list."""
    out: list[float] = []
    for k in range(1, min(len(alpha), len(v) - 1) + 1):
        if alpha[k - 1] is None:
            break
        out.append(expected_tokens([a for a in alpha[:k] if a is not None], k) / step_cost(k, c, v))
    return out


def best_k(speedups: list[float]) -> tuple[int, float]:
    """The k of the largest predicted speedup (the smallest such k on ties), and that speedup."""
    if not speedups:
        raise ValueError("no predicted speedup to choose from")
    k = max(range(len(speedups)), key=lambda i: (speedups[i], -i))
    return k + 1, speedups[k]


def break_even_cost(tokens_per_step: float, k: int, v_k: float) -> float:
    """The draft cost ``c`` (in target one-token forwards) at which ``S(k) = 1``: ``(E - v(k)) / k``;
    negative when even a free draft cannot pay off (E <= v(k))."""
    return (tokens_per_step - v_k) / k
