"""Where a layer-wise stage runs: resident or streamed from the shards, and where its activations wait.

The rule every layer-wise stage follows (:func:`choose_streaming`): ``load.stream`` ``on``/``off`` as asked;
``auto`` streams local safetensors checkpoints above :data:`~draftkit.checkpoint.stream.STREAM_ABOVE_BYTES`, or
ones whose resident estimate does not fit. The decision and its memory estimate (:mod:`draftkit.memory`, the one
estimator: commands, recipes, ``--dry-run`` and preflight read it) are made before any weights load, and a run that
cannot fit stops with one line. A stage's per-layer form (``layers`` in :mod:`draftkit.registry`) returns a
:class:`Placement`; the stage runner (:func:`draftkit.stages.run_stage_on`) follows it without knowing the stage.
:func:`write_streamed` gives a streamed stage its layer source and writes the folder around its shards.
(Moved here from ``draftkit/streamed.py``, which also held the prune and sparsify specifics, now in
``draftkit/prune/layerwise.py`` and ``draftkit/sparsify/layerwise.py``.)
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
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
from draftkit.checkpoint.stream import STREAM_ABOVE_BYTES
from draftkit.errors import InvalidInputError
from draftkit.memory import (
    PROCESS_BYTES,
    MemoryEstimate,
    activation_device,
    announce_before_heavy_work,
    check_fits,
    estimate_memory,
    gb,
)
from draftkit.modeling import text_config
from draftkit.provenance import PROVENANCE_FILE, make_provenance


@dataclass
class Placement:
    """A layer-wise stage's decision, before any weights load: streamed or resident, and the memory estimate.

    ``write(out=, overwrite=, arguments=) -> report``: a streamed stage that writes its output itself (shard by
    shard). ``run``: the stage function to run instead of the registered one (with ``model`` None when streamed:
    it reads the shards itself)."""

    streamed: bool
    estimate: MemoryEstimate | None
    write: Callable[..., dict[str, Any]] | None = None
    run: Callable[..., Any] | None = None


def calibration_estimator(config, *, size: int, device, load, tokens: int, seqlen: int, chunk_tokens: int,
                          sparsegpt: bool = False, forward: bool = True,
                          sparsify: str | None = None) -> Callable[[bool], MemoryEstimate]:
    """``est(streamed)``: the memory estimate of a calibration run over ``tokens`` tokens (prune scoring,
    sparsify with method ``sparsify``) for either decision. A run with no forward (``forward`` False) holds the
    weights alone."""

    def est(streamed: bool) -> MemoryEstimate:
        if not forward:
            n_layers = max(1, int(getattr(text_config(config), "num_hidden_layers", 1) or 1))
            return MemoryEstimate(PROCESS_BYTES + (size if not streamed else size // n_layers), 0, {"weights": size})
        return estimate_memory(config, ckpt_bytes=size, streamed=streamed, device=device, tokens=tokens,
                               seqlen=seqlen, chunk_tokens=min(chunk_tokens, tokens), sparsegpt=sparsegpt,
                               dtype_bytes=load_dtype_bytes(load, config), act_bytes=compute_bytes(),
                               sparsify=sparsify)

    return est


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
    streamed = decide_streaming(stream, est, can_stream=can_stream, size=size, device=device, always=always)
    estimate = est(streamed)
    estimate.streamed = streamed
    check_fits(estimate, streamed=streamed, can_stream=can_stream, device=device)
    return streamed, estimate


def decide_streaming(stream: str, est: Callable[[bool], MemoryEstimate], *, can_stream: bool, size: int, device,
                     always: bool = False) -> bool:
    """:func:`choose_streaming`'s decision alone (it never raises): what ``--dry-run`` and preflight estimate."""
    if stream == "off" or not can_stream:
        return False
    if stream == "on" or always:
        return True
    if size > STREAM_ABOVE_BYTES:
        return True
    try:
        check_fits(est(False), streamed=False, can_stream=True, device=device)
    except InvalidInputError:
        return True
    return False


def recipe_estimate(est: Callable[[bool], MemoryEstimate], load, *, size: int, device, always: bool = False) -> int:
    """The bytes a recipe stage will need by the rule its command follows (for a checkpoint that may not exist
    yet: it streams when it could, i.e. when ``load.stream`` allows): host, or device when it runs on one."""
    streamed = decide_streaming(load.stream, est, can_stream=True, size=size, device=device, always=always)
    e = est(streamed)
    return e.device or e.host


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




def write_streamed(stage: str, model_name: str, cfg: BaseModel, *, out: Path, load, estimate: MemoryEstimate,
                   work: Callable[..., dict[str, Any]], overwrite: bool = False,
                   arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a stage layer by layer from the checkpoint's shards and write ``out`` atomically: the stage's
    ``work(source, tmp, tokenizer, config) -> report`` writes the weights (``source.open_writer``, ... ,
    ``source.write_rest``) and may edit ``config``; the config, tokenizer and provenance are written here."""
    from draftkit.atomic import atomic_dir, atomic_write_json
    from draftkit.engine.layers import StreamedLayers

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
    with atomic_dir(out, overwrite=overwrite) as tmp:
        report = work(source, tmp, tokenizer, config)
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
        atomic_write_json(tmp / PROVENANCE_FILE, make_provenance(stage=stage, source=model_name, arguments=args, facts=report))
    report["output"] = str(out)
    report["total_seconds"] = round(time.perf_counter() - t0, 3)
    return report
