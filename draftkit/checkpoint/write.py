"""Write checkpoints: safetensors shard by shard with an index, and whole models with provenance."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from draftkit.checkpoint.files import SAFE_INDEX, SAFE_WEIGHTS, sync_progress_bars
from draftkit.errors import NonFiniteError
from draftkit.provenance import PROVENANCE_FILE


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000; ``"500MiB"`` -> 524_288_000; a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r} is not like 5GB, 500MB or 1000000")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    size = int(float(m.group(1)) * base**power)
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, *, max_shard_size: str = "5GB") -> list[str]:
    """Write ``tensors`` as one ``model.safetensors`` or as shards plus ``model.safetensors.index.json``.

    Shards are filled in order up to ``max_shard_size`` (a tensor larger than that gets its own shard).
    """
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = nbytes(t)
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().cpu().contiguous()
        size += n
    names = [SAFE_WEIGHTS] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                     for i in range(1, len(shards) + 1)]
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / fname), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {k: fname for fname, shard in zip(names, shards, strict=True) for k in shard}
        index = {"metadata": {"total_size": sum(nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def save_model(model, tokenizer, out: str | os.PathLike, *, provenance: dict[str, Any],
               overwrite: bool = False, max_shard_size: str = "5GB") -> Path:
    """Save model (safetensors), tokenizer, generation config and ``draftkit.json`` atomically."""
    from draftkit.atomic import atomic_dir

    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_model(model, tokenizer, tmp, provenance=provenance, max_shard_size=max_shard_size)
    return Path(out)


def write_model(model, tokenizer, folder: Path, *, provenance: dict[str, Any], max_shard_size: str = "5GB") -> None:
    """:func:`save_model`'s files written into ``folder`` (the temporary folder of an atomic output)."""
    from draftkit.atomic import atomic_write_json

    sync_progress_bars()
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    atomic_write_json(folder / PROVENANCE_FILE, provenance)


def check_finite(model, stage: str = "stage") -> None:
    """Refuse to save a model with NaN or Inf in any weight or buffer (a diverged or broken run).

    Raises:
        NonFiniteError: naming the first tensors affected; nothing has been written.
    """
    bad: list[str] = []
    n_bad = 0
    with torch.no_grad():
        for name, t in model.state_dict().items():
            # 16M values at a time: isfinite of a whole bf16 embedding (262M values at Llama-3's vocabulary) made
            # about 1.2 GB of temporaries, the run's peak
            if t.is_floating_point() and t.numel() and not all(
                    bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(2**24)):
                n_bad += 1
                if len(bad) < 3:
                    bad.append(f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)")
    if n_bad:
        more = f" and {n_bad - len(bad)} more tensors" if n_bad > len(bad) else ""
        raise NonFiniteError(
            f"{stage}: the result holds NaN/Inf weights in {', '.join(bad)}{more}; nothing was saved. "
            "The run diverged or its input is broken: check the input model, lower the learning rate, or use float32"
        )
