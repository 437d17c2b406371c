"""The merge, tensor by tensor from the checkpoints: every input read lazily in row chunks, every output
tensor written to its shard as its chunks are produced (:class:`~draftkit.checkpoint.stream.ShardWriter`),
so memory is a few chunks whatever the model size. The maths are :mod:`draftkit.merge.maths`.

Each tensor takes one or two passes over its chunks: the first gathers what the maths and the mask rules
need for the whole tensor (SLERP's norms and dot product, each input's zeros, whether the masks agree),
the second computes and writes.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from draftkit import console
from draftkit.checkpoint import (
    LazyCheckpoint,
    is_sparse_checkpoint,
    load_config,
    load_tokenizer,
    open_checkpoint,
    resolve_model_ref,
    torch_dtype,
)
from draftkit.checkpoint.stream import ShardWriter, read_rows
from draftkit.errors import InvalidInputError
from draftkit.merge import maths
from draftkit.merge.config import MergeConfig
from draftkit.modeling import text_config

CHUNK_ELEMENTS = 2**20  # values per row chunk of each input (4 MiB in float32)
SHARD_BYTES = 2 * 2**30
_LAYER = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.3.mlp.up_proj.weight`` -> 3), None outside layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


class _Rows:
    """Row chunks of one tensor of one checkpoint: plain file reads for a dense stored tensor, the
    decompressed tensor (one decoder weight) for a sparse-bitmask one."""

    def __init__(self, ckpt: LazyCheckpoint, key: str):
        self.ckpt, self.key = ckpt, key
        self.whole: torch.Tensor | None = None
        compressed = key.endswith(".weight") and key[: -len(".weight")] in ckpt.sparse_modules
        self.file: Path | None = ckpt.file_of[key] if not compressed and len(ckpt.shape[key]) > 0 else None

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        if self.file is not None:
            return read_rows(self.file, self.key, start, stop)
        if self.whole is None:
            self.whole = self.ckpt.get(self.key)
        return self.whole.reshape(-1)[start:stop] if self.whole.dim() == 0 else self.whole[start:stop]


def _chunks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


@dataclass
class _Facts:
    """What the merge found, for the report."""

    parallel_fallback: list[str] = field(default_factory=list)
    sparse_tensors: int = 0
    differing_masks: list[dict[str, Any]] = field(default_factory=list)
    layer_zeros: dict[int, list[int]] = field(default_factory=dict)  # layer -> [zeros, values] of its 2-D weights
    input_zeros: list[list[int]] = field(default_factory=list)


def check_same_architecture(names: list[str], ckpts: list[LazyCheckpoint]) -> None:
    """Every input has the first one's model type, tensors and shapes.

    Raises:
        InvalidInputError: one line naming the first model and tensor that differ.
    """
    first, ref = names[0], ckpts[0]
    ref_type = getattr(ref.config, "model_type", None)
    for name, ckpt in zip(names[1:], ckpts[1:], strict=True):
        kind = getattr(ckpt.config, "model_type", None)
        if kind != ref_type:
            raise InvalidInputError(f"merge: {name} is a {kind} model, {first} a {ref_type} model: "
                                    "only models of one architecture and shape can be merged")
        for key in ref.keys():
            if key not in ckpt:
                raise InvalidInputError(f"merge: {name} has no tensor {key}, which {first} has: "
                                        "only models of one architecture and shape can be merged")
            if ckpt.shape[key] != ref.shape[key]:
                raise InvalidInputError(
                    f"merge: tensor {key} is {list(ckpt.shape[key])} in {name} but {list(ref.shape[key])} in {first}: "
                    "only models of one architecture and shape can be merged (prune them alike first)")
        extra = [k for k in ckpt.keys() if k not in ref]
        if extra:
            raise InvalidInputError(f"merge: {name} has tensor {extra[0]}, which {first} lacks: "
                                    "only models of one architecture and shape can be merged")


def _merge_tensor(key: str, readers: list[_Rows], base: _Rows | None, cfg: MergeConfig, *, t: float,
                  weights: list[float], writer: ShardWriter, facts: _Facts, masked_kind: bool) -> None:
    shape = readers[0].ckpt.shape[key]
    numel = math.prod(shape)
    chunks = _chunks(shape)

    def inputs(a: int, b: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        return [r(a, b) for r in readers], (base(a, b) if base is not None else None)

    # pass 1: whole-tensor statistics
    zeros = [0] * len(readers)
    differ = 0
    sq0 = sq1 = dot = 0.0
    if cfg.method == "slerp" or masked_kind:
        for a, b in chunks:
            xs, _ = inputs(a, b)
            if masked_kind:
                keeps = [x != 0 for x in xs]
                for i, k in enumerate(keeps):
                    zeros[i] += int(k.numel() - k.sum())
                disagree = torch.zeros_like(keeps[0])
                for k in keeps[1:]:
                    disagree |= k != keeps[0]
                differ += int(disagree.sum())
            if cfg.method == "slerp":
                s = maths.slerp_statistics(xs[0], xs[1])
                sq0, sq1, dot = sq0 + s[0], sq1 + s[1], dot + s[2]
    sparse = masked_kind and numel > 0 and max(zeros) / numel >= cfg.min_sparsity
    rule = None if cfg.masks == "refuse" else cfg.masks
    if masked_kind:
        for i, z in enumerate(zeros):
            facts.input_zeros[i][0] += z
    if sparse:
        facts.sparse_tensors += 1
        if differ:
            facts.differing_masks.append({"tensor": key, "positions_differing": round(differ / numel, 6)})
            if rule is None:
                shares = ", ".join(f"{z / numel:.1%}" for z in zeros)
                raise InvalidInputError(
                    f"merge: the inputs' sparsity masks differ at {key} ({differ / numel:.1%} of positions; zeros "
                    f"{shares}): choose --masks intersect (keep what all keep), union or first; nothing was written")
    if cfg.method == "slerp":
        s0, s1, parallel = maths.slerp_coefficients(t, sq0, sq1, dot)
        if parallel:
            facts.parallel_fallback.append(key)

    layer = layer_of(key)
    out_zeros = 0

    def parts() -> Iterator[torch.Tensor]:
        nonlocal out_zeros
        for a, b in chunks:
            xs, bx = inputs(a, b)
            if cfg.method == "slerp":
                merged = maths.combine(xs, [s0, s1])
            elif cfg.method == "linear":
                merged = maths.linear(xs, weights)
            else:
                assert bx is not None
                merged = maths.task_arithmetic(xs, bx, weights)
            if sparse:
                keep = maths.merge_keep_masks([x != 0 for x in xs], rule)
                merged.masked_fill_(~keep, 0)
            merged = merged.to(writer.spec[key][2])
            if masked_kind:
                out_zeros += int((merged == 0).sum())
            yield merged.reshape([b - a, *shape[1:]]) if shape else merged.reshape(shape)

    writer.write_parts(key, parts())
    if masked_kind and layer is not None:
        acc = facts.layer_zeros.setdefault(layer, [0, 0])
        acc[0] += out_zeros
        acc[1] += numel


def merge_checkpoints(models: list[str], cfg: MergeConfig, *, out: str | Path, load, overwrite: bool = False,
                      arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge ``models`` (directories, hub ids or aliases of one architecture) into ``out`` with ``cfg``.

    Reads each tensor in row chunks and writes it at once: memory is a few chunks per input, whatever
    the model size. The output is a dense safetensors model (zeros in place: ``export --format sparse``
    compresses it) with the first model's config and tokenizer and ``draftkit.json``.

    Raises:
        InvalidInputError: fewer than two models, different architectures or shapes (the first tensor that
            differs is named), or sparsity masks that differ while ``cfg.masks`` is ``refuse``.
    """
    from draftkit.atomic import atomic_dir, atomic_write_json, check_output_dir
    from draftkit.provenance import PROVENANCE_FILE, make_provenance, read_provenance
    from draftkit.threads import apply_threads

    t0 = time.perf_counter()
    threads = apply_threads(load.threads)
    cfg = cfg.model_copy(update={"models": list(models)})
    cfg = MergeConfig.model_validate(cfg.model_dump())  # the method's rules checked with the models given
    if len(models) < 2:
        raise InvalidInputError("merge needs at least two models")
    out = check_output_dir(out, overwrite=overwrite, inputs=(*models, *([cfg.base] if cfg.base else [])))
    trust = load.trust_remote_code
    ckpts = [open_checkpoint(m, trust_remote_code=trust) for m in models]
    names = list(models)
    base_ckpt = open_checkpoint(cfg.base, trust_remote_code=trust) if cfg.base else None
    check_same_architecture(names + ([cfg.base] if cfg.base else []), ckpts + ([base_ckpt] if base_ckpt else []))
    ref = ckpts[0]
    out_dtype = None if load.dtype == "auto" else torch_dtype(load.dtype)
    tensors = [(k, ref.shape[k], out_dtype if out_dtype is not None and ref.dtype[k].is_floating_point else ref.dtype[k])
            for k in ref.keys()]
    n_layers = int(getattr(text_config(ref.config), "num_hidden_layers", 0) or 0)
    filters = cfg.t_filter_list()
    weights = cfg.model_weights()
    facts = _Facts(input_zeros=[[0, 0] for _ in models])
    size = ref.nbytes()
    console.info(f"merge ({cfg.method}) of {len(models)} models, {size / 1e9:.2f} GB each, tensor by tensor in chunks "
                 f"of at most {CHUNK_ELEMENTS * 4 / 2**20:.0f} MiB per input")
    from draftkit.memory_stages import announce, merge_estimate

    every = ckpts + ([base_ckpt] if base_ckpt else [])
    largest_sparse = max((math.prod(c.shape[f"{m}.weight"]) for c in every for m in c.sparse_modules), default=0)
    estimate = announce(merge_estimate(len(every), CHUNK_ELEMENTS, largest_sparse), "one chunk of each tensor at a time")
    config = load_config(models[0], trust_remote_code=trust)
    if is_sparse_checkpoint(ref.path) and hasattr(config, "quantization_config"):
        del config.quantization_config  # written dense (zeros in place)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, tensors, SHARD_BYTES)
        for key, _, dtype in console.track(tensors, "merging tensors"):
            kind = dtype.is_floating_point and ref.dtype[key].is_floating_point
            if not kind:  # integer buffers: the first model's
                writer.write({key: ref.get(key)})
                continue
            layer = layer_of(key)
            t = maths.resolve_t(key, cfg.t, filters, layer, n_layers) if cfg.method == "slerp" else cfg.t
            masked_kind = layer is not None and len(ref.shape[key]) >= 2
            if masked_kind:
                for acc in facts.input_zeros:
                    acc[1] += math.prod(ref.shape[key])
            _merge_tensor(key, [_Rows(c, key) for c in ckpts], _Rows(base_ckpt, key) if base_ckpt else None, cfg,
                          t=t, weights=weights, writer=writer, facts=facts, masked_kind=masked_kind)
        writer.close()
        if out_dtype is not None:
            config.dtype = out_dtype
        config.save_pretrained(tmp)
        src = resolve_model_ref(models[0])
        if src.local and (Path(ref.path) / "generation_config.json").is_file():
            shutil.copy(Path(ref.path) / "generation_config.json", tmp / "generation_config.json")
        load_tokenizer(models[0], trust_remote_code=trust).save_pretrained(tmp)
        report = _report(cfg, models, facts, weights, t0)
        report["memory_estimate_gb"] = estimate
        report["threads"] = threads
        args = {"config": cfg.model_dump(mode="json"), "load": load.model_dump(mode="json"), **(arguments or {})}
        provenance = make_provenance(stage="merge", source=models[0], arguments=args, facts=report)
        provenance["inputs"] = [{"model": m, "provenance": read_provenance(m) if Path(m).is_dir() else None}
                                for m in [*models, *([cfg.base] if cfg.base else [])]]
        atomic_write_json(tmp / PROVENANCE_FILE, provenance)
    report["output"] = str(out)
    return report


def _report(cfg: MergeConfig, models: list[str], facts: _Facts, weights: list[float], t0: float) -> dict[str, Any]:
    layers = [round(z / n, 6) if n else 0.0 for _, (z, n) in sorted(facts.layer_zeros.items())]
    total = sum(n for _, n in facts.layer_zeros.values())
    report: dict[str, Any] = {
        "stage": "merge", "method": cfg.method, "models": list(models),
        "masks": cfg.masks, "sparse_tensors": facts.sparse_tensors,
        "tensors_with_different_masks": len(facts.differing_masks),
        "different_masks": facts.differing_masks[:20],
        "input_sparsity": [round(z / n, 6) if n else 0.0 for z, n in facts.input_zeros],
        "sparsity": round(sum(z for z, _ in facts.layer_zeros.values()) / total, 6) if total else 0.0,
        "layer_sparsity": layers,
    }
    if cfg.method == "slerp":
        report.update(t=cfg.t, t_filters=list(cfg.t_filters), parallel_fallback=len(facts.parallel_fallback),
                      parallel_fallback_tensors=facts.parallel_fallback[:20])
    else:
        report["weights"] = weights
    if cfg.base:
        report["base"] = cfg.base
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def recipe_estimate(hf_config, cfg: MergeConfig, load, size: int) -> int:
    """What :func:`merge_checkpoints` will print for the recipe's models, read as dense (a sparse-bitmask input's
    largest weight, decompressed whole, is known only from its files: the command adds it)."""
    from draftkit.memory_stages import merge_estimate

    return merge_estimate(max(2, len(cfg.models) + (1 if cfg.base else 0)), CHUNK_ELEMENTS, 0).host
