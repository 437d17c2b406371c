"""Rough memory and time estimates of a recipe's stages, for ``draftkit run --dry-run`` and preflight.

Memory is estimated from the model configs alone (no weights are read): parameters x bytes per parameter,
times what each stage keeps beside the weights (optimizer state for full fine-tuning, Hessians for
SparseGPT, a second model for distill's teacher, eval's baseline and spec's target). Time is the time the
same stage took in an earlier run of the same folder when there was one; draftkit does not guess otherwise.
"""

from __future__ import annotations

import copy
from typing import Any

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def count_params(hf_config) -> int:
    """Parameters of a decoder-only transformer, from its config."""
    from draftkit.modeling import text_config

    tc = text_config(hf_config)
    h = int(getattr(tc, "hidden_size", 0) or 0)
    n_layers = int(getattr(tc, "num_hidden_layers", 0) or 0)
    inter = int(getattr(tc, "intermediate_size", 0) or 4 * h)
    vocab = int(getattr(tc, "vocab_size", 0) or 0)
    heads = int(getattr(tc, "num_attention_heads", 0) or 1)
    kv = int(getattr(tc, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(tc, "head_dim", 0) or (h // heads if heads else 0))
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    mlp = 3 * h * inter
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    return n_layers * (attn + mlp + 2 * h) + vocab * h * (1 if tied else 2) + h


def _bytes_per_param(hf_config, dtype: str) -> int:
    if dtype in _BYTES:
        return _BYTES[dtype]
    own = str(getattr(hf_config, "dtype", None) or vars(hf_config).get("torch_dtype") or "float32")
    return _BYTES.get(own.removeprefix("torch."), 4)


def _config_of(name: str, trust: bool):
    from draftkit.checkpoint import load_config
    from draftkit.errors import DraftkitError

    try:
        return load_config(name, trust_remote_code=trust)
    except DraftkitError:
        return None


def stage_estimates(recipe) -> list[dict[str, Any]]:
    """Per stage: ``{"memory_bytes": int | None, "params": int | None}`` (None where a config is unreadable)."""
    load = recipe.header.load
    trust = load.trust_remote_code
    cfg0 = _config_of(recipe.header.model, trust)
    out = []
    hf = cfg0
    for step in recipe.steps:
        if hf is None:
            out.append({"memory_bytes": None, "params": None})
            continue
        p = count_params(hf)
        b = _bytes_per_param(hf, load.dtype)
        weights = p * b
        c = step.config
        mem = 1.2 * weights
        if step.name == "sparsify":
            from draftkit.modeling import text_config

            tc = text_config(hf)
            h, inter = int(tc.hidden_size), int(getattr(tc, "intermediate_size", 4 * tc.hidden_size))
            mem = weights + 4 * (3 * h * h + inter * inter) + 0.2 * weights  # one layer's float32 Hessians
        elif step.name == "distill":
            train = weights + (p * 16 if not c.lora_rank else 0.2 * weights)  # fp32 master, grads, AdamW moments
            teacher = 0
            if c.regenerate and c.teacher and c.engine == "hf":
                tcfg = _config_of(c.teacher, trust)
                teacher = count_params(tcfg) * _bytes_per_param(tcfg, load.dtype) if tcfg is not None else 0
            mem = max(train, weights + teacher)
        elif step.name == "export":
            mem = 2 * weights
        elif step.name == "search":
            from draftkit.search import estimate_bytes

            mem = estimate_bytes(weights, p)
        elif step.name in ("eval", "spec"):
            other = c.baseline if step.name == "eval" else c.target
            ocfg = _config_of(other, trust) if other else None
            mem = weights + (count_params(ocfg) * _bytes_per_param(ocfg, load.dtype) if ocfg is not None else 0)
        out.append({"memory_bytes": int(mem), "params": p})
        if step.name == "prune":
            hf = after_prune(hf, c)
    return out


def after_prune(hf_config, cfg):
    """The config as the next stage will see it: fewer layers."""
    from draftkit.modeling import text_config
    from draftkit.prune.runner import parse_layer_ranges

    new = copy.deepcopy(hf_config)
    tc = text_config(new)
    n = getattr(tc, "num_hidden_layers", None)
    if isinstance(n, int):
        try:
            dropped = cfg.layers if cfg.layers is not None else len(parse_layer_ranges(cfg.drop))
        except ValueError:
            return new
        tc.num_hidden_layers = max(1, n - dropped)
    return new


def estimate_memory_bytes(recipe) -> dict[int, int]:
    """``{stage index: estimated peak bytes}`` for the stages whose configs could be read."""
    return {i: e["memory_bytes"] for i, e in enumerate(stage_estimates(recipe)) if e["memory_bytes"]}


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
