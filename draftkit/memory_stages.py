"""Memory estimates of the stages that work on whole models rather than one decoder layer: export, spec and merge.

Arithmetic on the models in memory and the checkpoints' sizes, printed as the other stages' estimate is
(:meth:`draftkit.memory.MemoryEstimate.line`) right before the part that peaks, and reported as
``memory_estimate_gb``:

* export: the Python process, the model's weights (each unique tensor once) and what the writer makes beside
  them: the sparse-bitmask tensors of every compressed weight (:func:`draftkit.bitmask.layout_bytes` of its
  non-zeros) and the written tensors that are copies (``--dtype`` casts; an MoE's experts split when that copies);
* spec: the process, the draft as it is in memory, the target in the compute dtype and, while the target loads
  in another dtype than the one it is stored in, its stored weights (transformers reads them whole, then casts);
* merge: a lighter process (no model code is imported, :data:`LIGHT_PROCESS_BYTES`) and the row chunks of every
  input in flight (``CHUNK_ELEMENTS`` of :mod:`draftkit.merge.runner`, float32 values each, a few copies), plus the
  largest sparse-bitmask input tensor decompressed whole.
"""

from __future__ import annotations

from typing import Any

import torch

from draftkit.memory import PROCESS_BYTES, MemoryEstimate, gb

# torch, safetensors and a tokenizer imported, but no transformers model code (the merge builds no model)
LIGHT_PROCESS_BYTES = int(0.3 * 2**30)
# merge: per input, the chunk read in its stored dtype and its float32 copy; the merged chunk and its output copy
MERGE_CHUNK_COPIES = 2


def model_bytes(model) -> int:
    """Bytes of a model's parameters and buffers, each tensor storage counted once (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def export_estimate(model, written: dict[str, torch.Tensor], compressed: list[str]) -> MemoryEstimate:
    """Peak of writing ``written`` (the tensors as stored: cast, an MoE's experts split) for ``model`` with the
    weights of the modules ``compressed`` in the sparse-bitmask layout."""
    from draftkit.bitmask import layout_bytes

    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    copies = sum(t.numel() * t.element_size() for t in written.values() if t.untyped_storage().data_ptr() not in own)
    layouts = 0
    for name in compressed:
        w = written[f"{name}.weight"]
        layouts += layout_bytes(tuple(w.shape), int(torch.count_nonzero(w)), w.element_size())
    parts = {"weights": model_bytes(model), "cast_copy": copies, "sparse_layout": layouts}
    return MemoryEstimate(PROCESS_BYTES + sum(parts.values()), 0, parts, "cpu")


def spec_estimate(draft, target: str, *, compute: torch.dtype | None, trust_remote_code: bool) -> MemoryEstimate:
    """Peak of loading ``target`` beside ``draft`` (in memory) for speculative decoding on the CPU or a GPU."""
    from draftkit.checkpoint import load_config, resolve_model_ref
    from draftkit.estimates import count_params
    from draftkit.memory import checkpoint_bytes

    config = load_config(target, trust_remote_code=trust_remote_code)
    stored_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(stored_dtype, str):
        stored_dtype = getattr(torch, stored_dtype.removeprefix("torch."), torch.float32)
    ref = resolve_model_ref(target)
    stored = checkpoint_bytes(ref.location) if ref.local else 0
    stored = stored or count_params(config) * stored_dtype.itemsize
    params = count_params(config)
    resident = params * (compute.itemsize if compute is not None else stored_dtype.itemsize)
    cast = compute is not None and compute != stored_dtype
    parts = {"draft": model_bytes(draft), "target": resident if cast else stored, "target_load": stored if cast else 0}
    device = next(draft.parameters()).device
    if device.type == "cuda":  # the weights live on the GPU; the stored copy passes through the host while loading
        return MemoryEstimate(PROCESS_BYTES + parts["target_load"], parts["draft"] + parts["target"], parts, "cuda")
    return MemoryEstimate(PROCESS_BYTES + sum(parts.values()), 0, parts, "cpu")


def merge_estimate(inputs: int, chunk_elements: int, largest_sparse: int) -> MemoryEstimate:
    """Peak of a merge of ``inputs`` models read in row chunks of ``chunk_elements`` values; ``largest_sparse``:
    values of the largest weight of a sparse-bitmask input (decompressed whole to be read), 0 when all are dense."""
    parts = {"chunks": (inputs + 1) * MERGE_CHUNK_COPIES * chunk_elements * 4, "decompressed": largest_sparse * 4}
    return MemoryEstimate(LIGHT_PROCESS_BYTES + sum(parts.values()), 0, parts, "cpu")


def announce(estimate: MemoryEstimate, how: str) -> dict[str, Any]:
    """Print the estimate's line now (the part that peaks comes next) and return it as report entries in GB."""
    from draftkit import console

    console.info(f"{estimate.line()}; {how}")
    return {"host": gb(estimate.host), "device": gb(estimate.device), **{k: gb(v) for k, v in estimate.parts.items()}}
