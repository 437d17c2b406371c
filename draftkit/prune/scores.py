"""Block-importance scores on hidden states: pure functions on tensors.

* Angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers", eq. 7):
  for a block of n layers starting at l, d(x_l, x_{l+n}) = arccos(cos(x_l, x_{l+n})) / pi, computed on the
  last token of each sequence and averaged over the calibration samples; the block with the smallest
  distance changes the residual stream least and is dropped.
* Block Influence (Men et al. 2024, "ShortGPT", eq. 1): BI_i = 1 - E_t[cos(x_{i,t}, x_{i+1,t})] over all
  tokens; the n layers with the lowest BI are dropped (not necessarily contiguous).
"""

from __future__ import annotations

import math

import torch


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) / pi along the last dimension, in [0, 1]."""
    a = a.double()
    b = b.double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


def block_distances(states: torch.Tensor, n: int) -> torch.Tensor:
    """Mean angular distance of every contiguous block of ``n`` layers.

    Args:
        states: ``[samples, L + 1, hidden]``: the last-token hidden state entering each of the L layers,
            followed by the one leaving the last layer (before the final norm).
        n: block length, 1 <= n <= L.

    Returns:
        ``[L - n + 1]`` tensor; entry l is the distance between x_l and x_{l+n}.
    """
    num_layers = states.shape[1] - 1
    if not 1 <= n <= num_layers:
        raise ValueError(f"block length {n} must be in [1, {num_layers}]")
    return torch.stack(
        [angular_distance(states[:, l], states[:, l + n]).mean() for l in range(num_layers - n + 1)]
    )


def choose_block(distances: torch.Tensor) -> int:
    """Start index of the block with the smallest distance (the earliest on ties)."""
    return int(torch.argmin(distances).item())


def lowest_influence(bi: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` layers with the lowest Block Influence, sorted."""
    return sorted(torch.topk(bi, n, largest=False).indices.tolist())


def parse_layer_ranges(spec: str) -> list[int]:
    """Parse ``"20-25"``, ``"3,5,7-9"`` (inclusive ranges) into a sorted list of unique indices."""
    out: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            a, b = int(lo), int(hi)
            if b < a:
                raise ValueError(f"range {part!r} runs backwards")
            out.update(range(a, b + 1))
        else:
            out.add(int(part))
    return sorted(out)
