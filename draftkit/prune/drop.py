"""Remove decoder blocks from a model and keep its config and KV cache consistent."""

from __future__ import annotations

from torch import nn

from draftkit.modeling import _find_layer_list, decoder, text_config

# Config lists with one entry per layer that are not per-layer settings.
_NOT_PER_LAYER = {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"}


def drop_layers(model: nn.Module, indices: list[int]) -> nn.Module:
    """Drop the decoder blocks at ``indices`` in place and return the model.

    Renumbers every ``layer_idx`` in the remaining blocks (the KV cache is indexed by it), sets
    ``num_hidden_layers`` and slices every per-layer list in the config (``layer_types`` on
    Gemma2/3 and Qwen2/3, ``no_rope_layers`` ...), so that ``generate`` with a cache and a reload with
    plain ``from_pretrained`` both work.
    """
    dec = decoder(model)
    found = _find_layer_list(dec, model)
    assert found is not None
    name, layers = found
    n = len(layers)
    drop = set(indices)
    if not drop:
        return model
    if min(drop) < 0 or max(drop) >= n:
        raise ValueError(f"layer indices must be in [0, {n - 1}], got {sorted(drop)}")
    if len(drop) >= n:
        raise ValueError(f"cannot drop all {n} layers")
    keep = [layer for i, layer in enumerate(layers) if i not in drop]
    setattr(dec, name, nn.ModuleList(keep))
    for new_idx, layer in enumerate(keep):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    configs = {id(model.config): model.config, id(text_config(model)): text_config(model)}
    for cfg in configs.values():
        slice_config(cfg, n, drop)
    return model


def slice_config(cfg, n: int, drop: set[int]) -> None:
    if getattr(cfg, "num_hidden_layers", None) != n:
        return
    for key, value in list(vars(cfg).items()):
        if key in _NOT_PER_LAYER or key.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and len(value) == n and all(
            v is None or isinstance(v, (str, int, float, bool)) for v in value
        ):
            setattr(cfg, key, type(value)(v for i, v in enumerate(value) if i not in drop))
    cfg.num_hidden_layers = n - len(drop)
