"""The memory estimates of a recipe's stages, for ``draftkit run --dry-run`` and preflight.

Each stage is estimated by the hook it registers (:mod:`draftkit.registry`), from the model configs alone (no
weights are read): the layer-wise stages (prune, sparsify) by the very estimate their command prints
(:mod:`draftkit.memory`, with the streaming decision of :mod:`draftkit.engine.placement`), distill by its training
estimate (:mod:`draftkit.distill.estimate`), export, spec and merge by the arithmetic their commands print
(:mod:`draftkit.memory_stages`, on the sizes the configs give), eval as its model plus the baseline it names. Time is the time the same stage took in an earlier run of the same folder when there was one; draftkit does
not guess otherwise. (Was ``draftkit/plan.py``: "plan" now means only what ``--dry-run`` shows.)
"""

from __future__ import annotations

from typing import Any

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _layer_linears(tc, *, experts: bool) -> list[tuple[int, int]]:
    """``(out, in)`` of one decoder layer's linear weights (attention, then MLP; with ``experts`` an MoE's routed
    experts at their own width), from a text config."""
    h = int(getattr(tc, "hidden_size", 0) or 0)
    heads = int(getattr(tc, "num_attention_heads", 0) or 1)
    kv = int(getattr(tc, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(tc, "head_dim", 0) or (h // heads if heads else 0))
    n = int(getattr(tc, "num_experts", 0) or getattr(tc, "num_local_experts", 0) or 0) if experts else 0
    inter = int((getattr(tc, "moe_intermediate_size", 0) if n else 0) or getattr(tc, "intermediate_size", 0) or 4 * h)
    return [(heads * head_dim, h), (kv * head_dim, h), (kv * head_dim, h), (h, heads * head_dim),
            *[(inter, h), (inter, h), (h, inter)] * max(1, n)]


def count_params(hf_config) -> int:
    """Parameters of a decoder-only transformer, from its config (an MoE counted as its dense width)."""
    from draftkit.modeling import text_config

    tc = text_config(hf_config)
    h = int(getattr(tc, "hidden_size", 0) or 0)
    n_layers = int(getattr(tc, "num_hidden_layers", 0) or 0)
    vocab = int(getattr(tc, "vocab_size", 0) or 0)
    linears = sum(o * i for o, i in _layer_linears(tc, experts=False))
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    return n_layers * (linears + 2 * h) + vocab * h * (1 if tied else 2) + h


def linear_shapes(hf_config) -> list[tuple[int, int]]:
    """``(out, in)`` of every decoder linear weight (attention, MLP; an MoE's routed experts), from the config."""
    from draftkit.modeling import text_config

    tc = text_config(hf_config)
    return _layer_linears(tc, experts=True) * int(getattr(tc, "num_hidden_layers", 0) or 0)


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


def model_bytes(name: str, load) -> int:
    """The weights of the model ``name`` names, from its config (0 when it cannot be read)."""
    hf = _config_of(name, load.trust_remote_code)
    return count_params(hf) * _bytes_per_param(hf, load.dtype) if hf is not None else 0


def weights_and_a_fifth(hf_config, cfg, load, size: int) -> int:
    """The default estimate of a stage: the process, its model, and a fifth more for what it computes."""
    from draftkit.memory import PROCESS_BYTES

    return PROCESS_BYTES + int(1.2 * size)


def weights_and_other(hf_config, cfg, load, size: int) -> int:
    """A measuring stage: its model and every other model its config names (eval's baseline, spec's target)."""
    from draftkit.memory import PROCESS_BYTES
    from draftkit.registry import stages

    entry = next((s for s in stages().values() if s.config is type(cfg)), None)
    data = cfg.model_dump(mode="json")
    others = entry.reference_fields(data) if entry is not None else ()
    return PROCESS_BYTES + size + sum(model_bytes(data[f], load) for f, kind in others
                      if kind == "model" and isinstance(data.get(f), str) and data[f])


def stage_estimates(recipe) -> list[dict[str, Any]]:
    """Per stage: ``{"memory_bytes": int | None, "params": int | None}`` (None where a config is unreadable), by
    each stage's registered estimate (:mod:`draftkit.registry`): the one its command prints where it has one."""
    from draftkit.checkpoint import resolve_model_ref
    from draftkit.memory import checkpoint_bytes
    from draftkit.registry import stages

    registry = stages()
    load = recipe.header.load
    hf = _config_of(recipe.header.model, load.trust_remote_code)
    try:
        ref = resolve_model_ref(recipe.header.model)
        size = checkpoint_bytes(ref.location) if ref.local else 0
    except Exception:  # noqa: BLE001 - preflight names an unresolvable model
        size = 0
    out = []
    for step in recipe.steps:
        if hf is None:
            out.append({"memory_bytes": None, "params": None})
            continue
        entry = registry[step.name]
        p = count_params(hf)
        size = size or p * _bytes_per_param(hf, load.dtype)
        estimate = entry.estimate or weights_and_a_fifth
        out.append({"memory_bytes": int(estimate(hf, step.config, load, size)), "params": p})
        if entry.after is not None:
            hf = entry.after(hf, step.config)
        if entry.makes_model:
            size = 0  # the next stage reads this one's output: sized from its config
    return out


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
