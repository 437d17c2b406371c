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

A recipe's ``--dry-run`` and preflight estimate these stages by the same functions (``*_recipe_estimate``, registered
in :mod:`draftkit.registry`), on the sizes the configs give: the model's parameters, the target's config and files,
the sparsity the recipe's sparsify stage asked.
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


def export_parts(weights: int, cast_copy: int, layouts: int) -> MemoryEstimate:
    """export's peak: the process, the weights, the written tensors that are copies and the sparse layouts."""
    parts = {"weights": weights, "cast_copy": cast_copy, "sparse_layout": layouts}
    return MemoryEstimate(PROCESS_BYTES + sum(parts.values()), 0, parts, "cpu")


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
    return export_parts(model_bytes(model), copies, layouts)


def target_facts(target: str, *, trust_remote_code: bool) -> tuple[int, int, torch.dtype]:
    """``(parameters, stored bytes, stored dtype)`` of the target, from its config and its files' sizes."""
    from draftkit.checkpoint import load_config, resolve_model_ref
    from draftkit.estimates import count_params
    from draftkit.memory import checkpoint_bytes

    config = load_config(target, trust_remote_code=trust_remote_code)
    stored_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(stored_dtype, str):
        stored_dtype = getattr(torch, stored_dtype.removeprefix("torch."), torch.float32)
    ref = resolve_model_ref(target)
    params = count_params(config)
    stored = (checkpoint_bytes(ref.location) if ref.local else 0) or params * stored_dtype.itemsize
    return params, stored, stored_dtype


def spec_parts(draft: int, target: tuple[int, int, torch.dtype], compute: torch.dtype | None,
               device: str) -> MemoryEstimate:
    """spec's peak: the process, the draft (``draft`` bytes), the target in the compute dtype and, while it loads
    in another dtype than it is stored in, its stored weights (``target``: :func:`target_facts`)."""
    params, stored, stored_dtype = target
    resident = params * (compute.itemsize if compute is not None else stored_dtype.itemsize)
    cast = compute is not None and compute != stored_dtype
    parts = {"draft": draft, "target": resident if cast else stored, "target_load": stored if cast else 0}
    if device == "cuda":  # the weights live on the GPU; the stored copy passes through the host while loading
        return MemoryEstimate(PROCESS_BYTES + parts["target_load"], parts["draft"] + parts["target"], parts, "cuda")
    return MemoryEstimate(PROCESS_BYTES + sum(parts.values()), 0, parts, "cpu")


def spec_estimate(draft, target: str, *, compute: torch.dtype | None, trust_remote_code: bool) -> MemoryEstimate:
    """Peak of loading ``target`` beside ``draft`` (in memory) for speculative decoding on the CPU or a GPU."""
    return spec_parts(model_bytes(draft), target_facts(target, trust_remote_code=trust_remote_code), compute,
                      next(draft.parameters()).device.type)


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


# ------------------------------------------------------------------------------------------------
# The same estimates for a recipe's stage, from the configs (``--dry-run``, preflight; :mod:`draftkit.registry`)
# ------------------------------------------------------------------------------------------------

def _estimate_bytes(e: MemoryEstimate) -> int:
    return e.device or e.host


def export_recipe_estimate(hf_config, cfg, load, size: int) -> int:
    """:func:`export_recipe_parts` in bytes (the registered estimate)."""
    return _estimate_bytes(export_recipe_parts(hf_config, cfg, load, size))


def export_recipe_parts(hf_config, cfg, load, size: int) -> MemoryEstimate:
    """What export's command will print for a model of ``size`` bytes with ``hf_config``: the written dtype's copy
    when ``dtype`` casts, and the decoder linears' sparse layouts at the sparsity the recipe's sparsify stage asked
    (:func:`draftkit.sparsify.layerwise.config_after`; none when nothing made the model sparse, as ``format: auto``
    then writes it dense)."""
    from draftkit.bitmask import theoretical_layout_bytes
    from draftkit.estimates import _BYTES, _bytes_per_param, count_params, linear_shapes

    stored = _bytes_per_param(hf_config, load.dtype)
    out = _BYTES.get(cfg.dtype, stored)
    cast = count_params(hf_config) * out if out != stored else 0
    sparsity = getattr(hf_config, "draftkit_sparsity", None)
    layouts = 0
    if cfg.format != "dense" and sparsity is not None and sparsity >= cfg.min_sparsity:
        layouts = int(sum(theoretical_layout_bytes(shape, sparsity, out) for shape in linear_shapes(hf_config)))
    return export_parts(size, cast, layouts)


def spec_recipe_estimate(hf_config, cfg, load, size: int) -> int:
    """:func:`spec_recipe_parts` in bytes (the registered estimate)."""
    return _estimate_bytes(spec_recipe_parts(hf_config, cfg, load, size))


def spec_recipe_parts(hf_config, cfg, load, size: int) -> MemoryEstimate:
    """What spec's command will print: the draft of ``size`` bytes beside its target in spec's compute dtype."""
    from draftkit.checkpoint import resolve_device
    from draftkit.compute import resolve_compute
    from draftkit.errors import DraftkitError

    device = resolve_device(load.device)
    try:
        target = target_facts(cfg.target, trust_remote_code=load.trust_remote_code)
    except DraftkitError:  # preflight names an unreadable target
        target = (0, 0, torch.float32)
    compute = resolve_compute(load.compute, device, stage="spec").dtype
    return spec_parts(size, target, compute, device.type)
