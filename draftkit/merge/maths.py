"""Model-merging maths as pure tensor functions (no draftkit imports), after mergekit.

* :func:`slerp`: spherical linear interpolation of two tensors, each taken as one flattened vector
  (mergekit ``merge_methods/slerp.py``; Shoemake 1985): the angle between the normalised vectors sets
  the two coefficients, and nearly parallel (or antiparallel) vectors, ``|dot| > dot_threshold``, fall
  back to linear interpolation. The coefficients multiply the original (unnormalised) tensors.
* :func:`linear`: the weighted average of the inputs (mergekit ``linear``, Wortsman et al. 2022,
  "model soups"), weights normalised to sum to one.
* :func:`task_arithmetic`: ``base + sum_i w_i (theta_i - base)`` (Ilharco et al. 2023, "Editing models
  with task arithmetic"; mergekit ``task_arithmetic``).
* :func:`merge_keep_masks`: which positions a merge of sparse tensors keeps (identical masks, or the
  ``intersect`` / ``union`` / ``first`` rule).
* :func:`resolve_t`: the interpolation factor of one tensor from a default and mergekit-style filters
  (first filter that is a substring of the tensor's name wins; a list is a gradient over the layers).

The functions split where a streamed merge needs them to: :func:`slerp_coefficients` takes the
statistics (two norms and a dot product) that a caller may accumulate over row chunks of a tensor too
large to hold, so a chunked merge computes exactly what :func:`slerp` computes on the whole tensor.
All arithmetic is float32 (float64 for float64 inputs), as in mergekit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DOT_THRESHOLD = 0.9995  # mergekit's default: |cos| above this is "nearly parallel" -> linear interpolation
EPS = 1e-8  # a norm at or below this counts as a zero vector (normalised by 1)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype merge arithmetic runs in: float64 for float64 inputs, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def slerp_statistics(v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float, float]:
    """``(|v0|^2, |v1|^2, v0 . v1)`` of the flattened tensors in the merge dtype, as Python floats (add
    these over row chunks to get the whole tensor's statistics)."""
    dtype = compute_dtype(v0)
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    return float(a.dot(a)), float(b.dot(b)), float(a.dot(b))


def slerp_coefficients(t: float, sq_norm0: float, sq_norm1: float, raw_dot: float, *,
                       dot_threshold: float = DOT_THRESHOLD, eps: float = EPS) -> tuple[float, float, bool]:
    """``(s0, s1, linear)``: the merge is ``s0 * v0 + s1 * v1``.

    ``dot`` is the cosine of the angle ``theta_0`` between ``v0`` and ``v1`` (norms at or below ``eps`` count
    as 1, as mergekit does); when ``|dot| > dot_threshold`` the vectors are nearly parallel and the
    coefficients are linear interpolation's ``(1 - t, t)``; otherwise
    ``s0 = sin((1 - t) theta_0) / sin(theta_0)`` and ``s1 = sin(t theta_0) / sin(theta_0)``.
    """
    norm0, norm1 = math.sqrt(sq_norm0), math.sqrt(sq_norm1)
    norm0 = norm0 if norm0 > eps else 1.0
    norm1 = norm1 if norm1 > eps else 1.0
    dot = max(-1.0, min(1.0, raw_dot / (norm0 * norm1)))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t, True
    theta_0 = math.acos(dot)
    sin_theta_0 = math.sin(theta_0)
    return math.sin((1.0 - t) * theta_0) / sin_theta_0, math.sin(t * theta_0) / sin_theta_0, False


def combine(tensors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """``sum_i c_i * tensors[i]`` in the merge dtype (:func:`compute_dtype`)."""
    dtype = compute_dtype(tensors[0])
    out = torch.zeros(tensors[0].shape, dtype=dtype)
    for x, c in zip(tensors, coefficients, strict=True):
        out.add_(x.to(dtype), alpha=float(c))
    return out


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = DOT_THRESHOLD,
          eps: float = EPS) -> torch.Tensor:
    """Spherical linear interpolation from ``v0`` (``t = 0``) to ``v1`` (``t = 1``), in the merge dtype."""
    s0, s1, _ = slerp_coefficients(t, *slerp_statistics(v0, v1), dot_threshold=dot_threshold, eps=eps)
    return combine([v0, v1], [s0, s1])


def linear_coefficients(weights: Sequence[float]) -> list[float]:
    """The weights normalised to sum to one (mergekit's ``normalize: true``)."""
    total = float(sum(weights))
    if total == 0:
        raise ValueError("linear merge weights sum to zero")
    return [float(w) / total for w in weights]


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i theta_i / sum_i w_i``."""
    return combine(tensors, linear_coefficients(weights))


def task_arithmetic(tensors: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``base + sum_i w_i (theta_i - base)``: each input's task vector, weighted, added to the base."""
    dtype = compute_dtype(base)
    b = base.to(dtype)
    out = b.clone()
    for x, w in zip(tensors, weights, strict=True):
        out.add_(x.to(dtype) - b, alpha=float(w))
    return out


# ------------------------------------------------------------------------------------------ masks

MASK_RULES = ("intersect", "union", "first")


def merge_keep_masks(keeps: Sequence[torch.Tensor], rule: str | None) -> torch.Tensor:
    """The keep-mask (True = may be non-zero) of a merge of inputs with keep-masks ``keeps``.

    Identical masks give that mask whatever the rule. Different masks need a rule: ``intersect`` keeps
    the positions every input keeps, ``union`` those any input keeps, ``first`` the first input's.

    Raises:
        ValueError: the masks differ and ``rule`` is None.
    """
    first = keeps[0]
    if all(torch.equal(first, k) for k in keeps[1:]):
        return first
    if rule is None:
        raise ValueError("the inputs' sparsity masks differ")
    if rule == "first":
        return first
    out = first.clone()
    for k in keeps[1:]:
        if rule == "intersect":
            out &= k
        elif rule == "union":
            out |= k
        else:
            raise ValueError(f"unknown mask rule {rule!r}: use {', '.join(MASK_RULES)}")
    return out


# ------------------------------------------------------------------------------------------ t per tensor

def parse_t_filter(text: str) -> tuple[str, list[float]]:
    """``"self_attn=0.3"`` -> ("self_attn", [0.3]); ``"mlp=0:0.5:1"`` -> ("mlp", [0, 0.5, 1]) (a gradient)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"{text!r} is not FILTER=VALUE (e.g. self_attn=0.3 or mlp=0:0.5:1)")
    try:
        values = [float(v) for v in value.split(":")]
    except ValueError:
        raise ValueError(f"{text!r}: the value must be a number or numbers joined by ':' (a gradient)") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{text!r}: values must lie in [0, 1]")
    return name.strip(), values


def gradient_value(values: Sequence[float], position: float) -> float:
    """mergekit's gradient: ``values`` spread evenly over ``position`` in [0, 1], linearly interpolated."""
    if len(values) == 1:
        return float(values[0])
    scaled = position * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * float(values[i0]) + frac * float(values[i1])


def resolve_t(name: str, default: float, filters: Sequence[tuple[str, Sequence[float]]],
              layer: int | None, n_layers: int) -> float:
    """The ``t`` of tensor ``name``: the first filter that is a substring of ``name`` (``*`` matches every
    tensor), else ``default``. A gradient's position is ``layer / (n_layers - 1)`` for a tensor of decoder
    layer ``layer`` and 0 for the others (embeddings, final norm, head), as mergekit resolves it."""
    position = 0.0 if layer is None else (layer / (n_layers - 1) if n_layers > 1 else 1.0)
    for pattern, values in filters:
        if pattern == "*" or pattern in name:
            return gradient_value(values, position)
    return float(default)
