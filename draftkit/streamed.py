"""The prune and sparsify stages on checkpoints read one decoder layer at a time.

:func:`plan_run` decides, before any weights load, whether a run streams (``load.stream``: ``on``,
``off``, or ``auto``: local safetensors checkpoints above :data:`~draftkit.checkpoint.stream.STREAM_ABOVE_BYTES`,
or ones whose resident estimate does not fit), prints the memory estimate, and stops with one line when
the run cannot fit. :func:`run_streamed` then runs the stage through
:class:`~draftkit.layerwise.StreamedLayers` and writes the output shard by shard.

``prune`` with explicit indices (``--drop``) or ``--method last`` runs no forward at all: the kept
layers' tensors are copied under their new numbers, one tensor at a time.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from draftkit.checkpoint import (
    is_sparse_checkpoint,
    load_config,
    load_tokenizer,
    resolve_device,
    resolve_model_ref,
    torch_dtype,
)
from draftkit.checkpoint.stream import STREAM_ABOVE_BYTES, is_streamable
from draftkit.errors import InvalidInputError
from draftkit.memory import (
    MemoryEstimate,
    activation_device,
    announce_before_heavy_work,
    check_fits,
    checkpoint_bytes,
    estimate_memory,
    gb,
    heavy_work_starts,
)
from draftkit.modeling import text_config
from draftkit.provenance import PROVENANCE_FILE, make_provenance

SHARD_BYTES = 2 * 2**30


def _needs_forward(name: str, cfg: BaseModel) -> bool:
    if name == "prune":
        return (cfg.drop is None and cfg.method != "last") or getattr(cfg, "experts", None) is not None
    return cfg.method != "magnitude"


def plan_run(name: str, model_name: str, cfg: BaseModel, load) -> tuple[bool, MemoryEstimate]:
    """Stream or not, and the memory estimate (printed); raises when the run cannot fit."""
    config, device, can_stream, size = checkpoint_facts(model_name, load)
    forward = _needs_forward(name, cfg)
    calib = cfg.calib
    tc = text_config(config)
    seqlen = min(calib.seqlen, getattr(tc, "max_position_embeddings", None) or calib.seqlen)
    tokens = calib.samples * seqlen if forward else 0
    if name == "prune":
        chunk = cfg.batch_size * seqlen
    else:
        from draftkit.sparsify.calib import _auto_chunk_tokens

        chunk = cfg.chunk_tokens or _auto_chunk_tokens(config, seqlen, device)
    dtype_bytes = load_dtype_bytes(load, config)
    sparsegpt = name == "sparsify" and cfg.method == "sparsegpt"

    def est(streamed: bool) -> MemoryEstimate:
        if not forward:
            return MemoryEstimate(int(0.45 * 2**30) + (size if not streamed else size // max(1, tc.num_hidden_layers)),
                                  0, {"weights": size})
        return estimate_memory(config, ckpt_bytes=size, streamed=streamed, device=device, tokens=tokens,
                               seqlen=seqlen, chunk_tokens=min(chunk, tokens), sparsegpt=sparsegpt,
                               dtype_bytes=dtype_bytes, act_bytes=compute_bytes())

    return choose_streaming(model_name, load.stream, est, can_stream=can_stream, size=size, device=device,
                            always=name == "prune" and not forward)


def checkpoint_facts(model_name: str, load) -> tuple[Any, Any, bool, int]:
    """``(config, compute device, can stream, checkpoint bytes)`` of a model, before any weights load."""
    ref = resolve_model_ref(model_name)
    config = load_config(model_name, trust_remote_code=load.trust_remote_code)
    can_stream = ref.local and is_streamable(ref.location)
    return config, resolve_device(load.device), can_stream, checkpoint_bytes(ref.location) if ref.local else 0


def estimate_facts(estimate: MemoryEstimate) -> dict[str, float]:
    """The estimate as report entries, in GB."""
    return {"host": gb(estimate.host), "device": gb(estimate.device), **{k: gb(v) for k, v in estimate.parts.items()}}


def choose_streaming(model_name: str, stream: str, est: Callable[[bool], MemoryEstimate], *, can_stream: bool,
                     size: int, device, always: bool = False) -> tuple[bool, MemoryEstimate]:
    """The rule every streamed stage follows: ``stream`` ``on``/``off`` as asked (``always``: a run that
    needs no forward streams whenever it can); ``auto`` streams a streamable checkpoint above
    :data:`STREAM_ABOVE_BYTES` or whose resident estimate ``est(False)`` does not fit. Returns the
    decision and its estimate.

    Raises:
        InvalidInputError: ``--stream on`` for a checkpoint that is not local safetensors, or the chosen
            run does not fit (one line saying what to change).
    """
    if stream == "on" and not can_stream:
        raise InvalidInputError(
            f"--stream on needs a local safetensors checkpoint; {model_name} is not one: "
            "save it with save_pretrained(safe_serialization=True) or pass --stream auto"
        )
    if stream == "off" or not can_stream:
        streamed = False
    elif stream == "on" or always:
        streamed = True
    else:
        streamed = size > STREAM_ABOVE_BYTES
        if not streamed:
            try:
                check_fits(est(False), streamed=False, can_stream=True, device=device)
            except InvalidInputError:
                streamed = True
    estimate = est(streamed)
    estimate.streamed = streamed
    check_fits(estimate, streamed=streamed, can_stream=can_stream, device=device)
    return streamed, estimate


def compute_bytes() -> int | None:
    """Bytes per activation value in the running stage's compute dtype (None: the weights' dtype)."""
    from draftkit.compute import current_dtype

    dt = current_dtype()
    return None if dt is None else dt.itemsize


def load_dtype_bytes(load, config) -> int:
    """Bytes per weight and activation value of a run: ``load.dtype``, or the checkpoint's own."""
    if load.dtype != "auto":
        return 4 if load.dtype == "float32" else 2
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return 2 if str(dt).replace("torch.", "") in ("bfloat16", "float16") else 4


def run_streamed(name: str, model_name: str, cfg: BaseModel, *, out: Path, load, estimate: MemoryEstimate,
                 overwrite: bool = False, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``prune`` or ``sparsify`` layer by layer from the checkpoint's shards; write ``out``."""
    from draftkit.io import atomic_dir, atomic_write_json
    from draftkit.layerwise import StreamedLayers

    t0 = time.perf_counter()
    ref = resolve_model_ref(model_name)
    config = load_config(model_name, trust_remote_code=load.trust_remote_code)
    if is_sparse_checkpoint(ref.location) and hasattr(config, "quantization_config"):
        del config.quantization_config  # read decompressed, written dense: a dense output has no sparsity_config
    tokenizer = load_tokenizer(model_name, trust_remote_code=load.trust_remote_code)
    device = resolve_device(load.device)
    dtype = None if load.dtype == "auto" else torch_dtype(load.dtype)
    source = StreamedLayers(ref.location, config, device=device, dtype=dtype, trust_remote_code=load.trust_remote_code)
    source.store = activation_device(estimate, device)
    announce_before_heavy_work(estimate)
    n_layers = len(source.layers)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if name == "sparsify":
            from draftkit.sparsify.runner import sparsify_with_tokens

            source.open_writer(tmp, list(range(n_layers)), SHARD_BYTES)
            _, report = sparsify_with_tokens(None, cfg, None, tokenizer=tokenizer, source=source)
            source.write_rest()
        else:
            report = _prune(source, cfg, tokenizer, tmp)
            drop = set(report["dropped_layers"])
            from draftkit.moe.remove import set_expert_count
            from draftkit.prune.drop import _slice_config

            if "experts" in report:
                set_expert_count(config, report["experts"]["experts_after"])

            for c in {id(config): config, id(text_config(config)): text_config(config)}.values():
                _slice_config(c, n_layers, drop)
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if (Path(ref.location) / extra).is_file():
                shutil.copy(Path(ref.location) / extra, tmp / extra)
        tokenizer.save_pretrained(tmp)
        report["streamed"] = True
        report["memory_estimate_gb"] = estimate_facts(estimate)
        args = {"config": cfg.model_dump(mode="json"), "load": load.model_dump(mode="json"), **(arguments or {})}
        atomic_write_json(tmp / PROVENANCE_FILE, make_provenance(stage=name, source=model_name, arguments=args, facts=report))
    report["output"] = str(out)
    report["total_seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _prune(source, cfg, tokenizer, tmp: Path) -> dict[str, Any]:
    from draftkit.data import model_max_length
    from draftkit.moe.prune import ExpertPruning
    from draftkit.moe.stream import rewrite_layer
    from draftkit.prune.runner import choose_blocks_and_experts, collect_layer_states

    t0 = time.perf_counter()
    ckpt = source.ckpt
    n_layers = len(source.layers)
    experts = ExpertPruning(source.model, cfg.experts, cfg.expert_method) if cfg.experts is not None else None
    dropped, part = choose_blocks_and_experts(
        cfg, n_layers, tokenizer, model_max_length(source.model), experts,
        lambda samples, hook: collect_layer_states(None, samples, batch_size=cfg.batch_size, source=source,
                                                   before_layer=hook),
    )
    keep = [i for i in range(n_layers) if i not in set(dropped)]
    heavy_work_starts()
    writer = source.open_writer(tmp, keep, SHARD_BYTES)
    pattern_keys = _layer_keys(source)
    for old in keep:
        if experts is not None or source.reader is not source.ckpt:  # read, experts removed, written as stored
            rewrite_layer(source, old, experts)
            continue
        for k in pattern_keys.get(old, []):  # no forward: copy each kept layer's tensors under its new number
            source.copy(k, source._renamed(k))
    source.write_rest()
    report = {
        "stage": "prune", "method": part.pop("method"), "layers_before": n_layers, **part,
        "dropped_layers": dropped, "layers_after": len(keep),
        "params_before": sum(math.prod(s) for s in ckpt.shape.values()),
        "params_after": sum(math.prod(e[1]) for e in writer.spec.values()),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if experts is not None:
        report["experts"] = experts.finish(dropped)
    return report


def _layer_keys(source) -> dict[int, list[str]]:
    from draftkit.checkpoint.stream import layer_key_pattern

    pattern = layer_key_pattern(source.prefix)
    out: dict[int, list[str]] = {}
    for k in sorted(source.ckpt.keys()):
        m = pattern.match(k)
        if m:
            out.setdefault(int(m.group(1)), []).append(k)
    return out

