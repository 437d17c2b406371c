"""The compressed-tensors ``sparse-bitmask`` layout as pure tensor functions (no draftkit imports).

The layout is the one compressed-tensors wrote up to 0.14
(``compressors/sparse_compressors/sparse_bitmask.py`` and ``utils/helpers.py``): for each compressed
2-D weight of module ``M`` the checkpoint holds

* ``M.shape``: int64 ``[rows, cols]``
* ``M.compressed``: the non-zero values in row-major order, in the weight's dtype
* ``M.bitmask``: uint8 ``[rows, ceil(cols / 8)]``, ``numpy.packbits(mask, axis=-1, bitorder="little")``,
  so column ``c`` is bit ``c % 8`` (least significant first) of byte ``c // 8``
* ``M.row_offsets``: int64 ``[rows]``, the index in ``compressed`` where each row starts

and ``config.json`` carries ``quantization_config = {quant_method: compressed-tensors, version,
sparsity_config: {format: sparse-bitmask, ...}, transform_config: {}}``. compressed-tensors 0.15+ and
recent vLLM dropped the format, so :mod:`draftkit.checkpoint` reads it with these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

SPARSE_FORMAT = "sparse-bitmask"
QUANT_METHOD = "compressed-tensors"
# The compressed-tensors version whose layout this writes (recorded as quantization_config.version).
LAYOUT_VERSION = "0.14.0"
PARAM_NAMES = ("shape", "compressed", "bitmask", "row_offsets")


def pack_bitmasks(bytemasks: torch.Tensor) -> torch.Tensor:
    """Bool ``[rows, cols]`` -> uint8 ``[rows, ceil(cols/8)]``, little bit order (as compressed-tensors)."""
    return torch.from_numpy(np.packbits(bytemasks.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bitmasks(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bitmasks`: uint8 ``[rows, ceil(cols/8)]`` -> bool ``shape``."""
    bits = np.unpackbits(packed.cpu().numpy(), axis=-1, count=int(shape[-1]), bitorder="little")
    return torch.from_numpy(bits.reshape(list(shape)).astype(bool))


def bitmask_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A dense 2-D weight -> ``{shape, compressed, bitmask, row_offsets}``."""
    weight = weight.detach().cpu()
    bytemasks = weight != 0
    row_counts = bytemasks.sum(dim=-1)
    row_offsets = torch.cumsum(row_counts, 0) - row_counts
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "compressed": weight[bytemasks].contiguous(),
        "bitmask": pack_bitmasks(bytemasks),
        "row_offsets": row_offsets.to(torch.int64),
    }


def layout_problem(shape: list[int], compressed_shape: list[int], bitmask_shape: list[int]) -> str | None:
    """What is inconsistent in one compressed weight's stored shapes (None when nothing), checked before
    anything is allocated: a ``shape`` that the bitmask cannot cover (a shape bomb) or more values than
    the weight has room for."""
    if len(shape) != 2 or any(d <= 0 for d in shape):
        return f"its shape {shape} is not two positive sizes"
    rows, cols = shape
    if list(bitmask_shape) != [rows, math.ceil(cols / 8)]:
        return f"its bitmask is {list(bitmask_shape)}, but a {rows}x{cols} weight needs [{rows}, {math.ceil(cols / 8)}]"
    if len(compressed_shape) != 1 or compressed_shape[0] > rows * cols:
        return f"it stores {list(compressed_shape)} values for a {rows}x{cols} weight"
    return None


def bitmask_decompress(compressed: torch.Tensor, bitmask: torch.Tensor, shape: list[int] | torch.Tensor) -> torch.Tensor:
    """``{compressed, bitmask, shape}`` -> the dense weight (row offsets are implied by the mask).

    Raises:
        ValueError: the three disagree (:func:`layout_problem`, or the mask marks another number of
            values than ``compressed`` holds).
    """
    dims = [int(x) for x in (shape.tolist() if isinstance(shape, torch.Tensor) else shape)]
    problem = layout_problem(dims, list(compressed.shape), list(bitmask.shape))
    if problem:
        raise ValueError(problem)
    mask = unpack_bitmasks(bitmask, dims)
    marked = int(mask.sum())
    if marked != compressed.numel():
        raise ValueError(f"its bitmask marks {marked} non-zero values but {compressed.numel()} are stored")
    dense = torch.zeros(dims, dtype=compressed.dtype)
    dense[mask] = compressed
    return dense


def layout_bytes(shape: tuple[int, int] | list[int], nnz: int, element_size: int) -> int:
    """Bytes of the four tensors of one compressed weight: values + bitmask + row offsets + shape."""
    rows, cols = int(shape[0]), int(shape[1])
    return nnz * element_size + rows * math.ceil(cols / 8) + rows * 8 + 2 * 8


def theoretical_layout_bytes(shape: tuple[int, int] | list[int] | torch.Size, sparsity: float, element_size: int) -> float:
    """The layout's size at ``sparsity`` (fraction of zeros)."""
    rows, cols = int(shape[0]), int(shape[1])
    return (1.0 - sparsity) * rows * cols * element_size + rows * math.ceil(cols / 8) + rows * 8 + 16


def compress_state_dict(state: dict[str, torch.Tensor], modules: list[str],
                        after_each: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """Replace ``M.weight`` by the four bitmask tensors for every module name ``M`` in ``modules``;
    ``after_each()`` is called after each weight is compressed (e.g. to hand freed memory back)."""
    targets = set(modules)
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix in targets:
            for key, t in bitmask_compress(value).items():
                out[f"{prefix}.{key}"] = t
            if after_each is not None:
                after_each()
        else:
            out[name] = value
    return out


def compressed_groups(names) -> set[str]:
    """Module names ``M`` that have a ``M.bitmask`` among ``names``."""
    return {name[: -len(".bitmask")] for name in names if name.endswith(".bitmask")}


def decompress_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compress_state_dict`: every ``M.{shape,compressed,bitmask,row_offsets}`` group
    becomes ``M.weight``; other tensors pass through."""
    groups = compressed_groups(tensors)
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in groups and leaf in PARAM_NAMES:
            if leaf == "compressed":
                out[f"{prefix}.weight"] = bitmask_decompress(
                    value, tensors[f"{prefix}.bitmask"], tensors[f"{prefix}.shape"]
                )
            continue
        out[name] = value
    return out
