"""Streaming MoE checkpoints one decoder layer at a time: on disk the routed experts are per-expert tensors
(``mlp.experts.3.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.3.w1.weight``), in the model they are
fused 3-D parameters (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``).

The mapping between the two is transformers' own: the conversion mapping ``from_pretrained`` applies when it
loads (:func:`transformers.conversion_mapping.get_model_conversion_mapping`, its ``WeightConverter`` and
``WeightRenaming`` transforms) and the one ``save_pretrained`` reverses when it saves
(:func:`transformers.core_model_loading.revert_weight_conversion`). :class:`ConvertedCheckpoint` applies it to
one layer's tensors at a time, so the layer-wise engine reads a fused parameter from its per-expert tensors and
writes a finished layer back under the names (and layout) ``save_pretrained`` would have written.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch

from draftkit.checkpoint.files import LazyCheckpoint


def _transforms(model: Any, *, saving: bool) -> list[Any]:
    from transformers.conversion_mapping import get_model_conversion_mapping

    return list(get_model_conversion_mapping(model, add_legacy=not saving))


class ConvertedCheckpoint:
    """A :class:`LazyCheckpoint` seen under the model's parameter names (read side), with the way back
    (:meth:`to_disk`, write side).

    Attributes:
        file_of, shape, dtype: per model key, as :class:`LazyCheckpoint` gives them per stored key.
        sources: per model key, the stored keys it is built from (in the order transformers stacks them).
        consumed: every stored key some model key is built from.
    """

    def __init__(self, ckpt: LazyCheckpoint, model: Any, groups: dict[str, tuple[Any, list[tuple[str, str]]]]):
        self.raw = ckpt
        self.model = model
        self.path, self.files = ckpt.path, ckpt.files
        self._groups = groups  # model key -> (converter or None, [(stored key, source pattern)])
        self.sources = {k: [s for s, _ in srcs] for k, (_, srcs) in groups.items()}
        self.consumed = {s for srcs in self.sources.values() for s in srcs}
        self.file_of: dict[str, Any] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        for key in groups:
            t = self._convert(key, {s: torch.empty(ckpt.shape[s], dtype=ckpt.dtype[s], device="meta")
                                    for s in self.sources[key]})
            first = self.sources[key][0]
            self.file_of[key], self.shape[key], self.dtype[key] = ckpt.file_of[first], tuple(t.shape), t.dtype

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def _convert(self, key: str, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        converter, srcs = self._groups[key]
        if converter is None:
            return stored[srcs[0][0]]
        conv = copy.deepcopy(converter)  # each target gets its own instance, as in from_pretrained
        for s, pattern in srcs:
            conv.add_tensor(key, s, pattern, stored.pop(s))
        out = conv.convert(key, model=self.model, config=getattr(self.model, "config", None))
        t = out[key]
        return t[0] if isinstance(t, list) else t

    def read(self, keys: Iterable[str], *, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named model tensors, each built from its stored tensors (read, converted, then cast)."""
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            stored = self.raw.read(self.sources[key])
            t = self._convert(key, stored)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[key] = t.to(device)
        return out

    def get(self, key: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.read([key], device=device, dtype=dtype)[key]

    def nbytes(self, keys: Iterable[str] | None = None) -> int:
        keys = self.file_of if keys is None else keys
        return sum(math.prod(self.shape[k]) * torch.empty((), dtype=self.dtype[k]).element_size() for k in keys)

    def to_disk(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model-named tensors of whole modules under the names ``save_pretrained`` writes (per-expert tensors
        split from a fused parameter); works on meta tensors too (shapes only)."""
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, dict(tensors))


def converted_checkpoint(ckpt: LazyCheckpoint, model: Any) -> LazyCheckpoint | ConvertedCheckpoint:
    """``ckpt`` under ``model``'s parameter names: a :class:`ConvertedCheckpoint` when transformers' conversion
    mapping builds some parameter from other stored tensors (fused experts), else ``ckpt`` itself."""
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    transforms = _transforms(model, saving=False)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not converters:
        return ckpt
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = dict(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", None)
    groups: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
    for key in sorted(ckpt.keys(), key=dot_natural_key):  # the order from_pretrained stacks experts in
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = key, None
        if renamed not in meta:
            renamed, pattern = key, None  # used by no parameter: check_complete names it
        converter = by_pattern[pattern] if pattern is not None else None
        groups.setdefault(renamed, (converter, []))[1].append((key, pattern or key))
    if all(c is None and len(s) == 1 and s[0][0] == k for k, (c, s) in groups.items()):
        return ckpt
    return ConvertedCheckpoint(ckpt, model, groups)


def disk_entries(view: ConvertedCheckpoint, params: dict[str, torch.Tensor],
                 dtype_of) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The stored names, shapes and dtypes that ``params`` (model-named, meta or real) are written as;
    ``dtype_of(model key)`` gives each one's output dtype."""
    meta = {k: torch.empty(tuple(p.shape), dtype=dtype_of(k), device="meta") for k, p in params.items()}
    return [(k, tuple(t.shape), t.dtype) for k, t in view.to_disk(meta).items()]


def rewrite_layer(source, i: int, experts) -> None:
    """Write decoder layer ``i`` of a streamed MoE checkpoint (:class:`draftkit.engine.layers.StreamedLayers` with
    an output open): read it, remove the experts ``experts`` (:class:`draftkit.moe.prune.ExpertPruning`, or
    None) chose for it during the scoring pass, write it in the stored layout and free it."""
    from draftkit.checkpoint.stream import load_module
    from draftkit.modeling import text_config
    from draftkit.moe.arch import find_moe_blocks
    from draftkit.moe.remove import remove_experts

    layer = source.layers[i]
    load_module(layer, f"{source.prefix}.{i}", source.keys, source.reader, device="cpu", dtype=source.dtype)
    if experts is not None:
        for block in find_moe_blocks(layer, text_config(source.model)):
            chosen = experts.layers.get(f"{experts.prefix}.{i}.{block.name}")
            if chosen is not None:
                remove_experts(block, chosen["kept"])
    source.done(i)
