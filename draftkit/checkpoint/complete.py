"""One completeness check of a checkpoint against its config, used by every path that loads weights.

transformers fills a tensor the checkpoint lacks with fresh random values and drops one the model does
not use, with a log line at most: ``num_hidden_layers: 6`` over tensors for 4 layers gave a model with two
invented layers, ``3`` over 4 silently lost the fourth. draftkit refuses both, naming the tensors:

* whole loads (:func:`~draftkit.checkpoint.load_model`: directories, hub models, GGUF files, sparse
  exports) pass transformers' own loading report (after its key renaming and tied weights);
* layer streaming (:func:`~draftkit.checkpoint.stream.parameter_keys`) compares the checkpoint's keys
  with the skeleton's parameters.

Allowed, as transformers documents them: a tied output head stored once under the embeddings' key (or
stored as well), rotary-embedding buffers that older checkpoints carry (computed from the config, never
read), buffers the model computes itself, and the patterns a model class lists in
``_keys_to_ignore_on_load_missing`` / ``_keys_to_ignore_on_load_unexpected``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from draftkit.errors import ModelLoadError

# Stored tensors transformers never reads and recomputes from the config (rotary frequencies and caches).
_UNUSED_OK = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
SHOWN = 3


def _ignored(model: Any, which: str) -> list[re.Pattern]:
    patterns = getattr(model, f"_keys_to_ignore_on_load_{which}", None) or []
    return [re.compile(p) for p in patterns]


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def _layers(keys: list[str]) -> str:
    found = sorted({int(m[1]) for k in keys if (m := _LAYER.search(k))})
    return f" in layers {', '.join(map(str, found))}" if found else ""


def _config_layers(config: Any) -> str:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    return f" (config.json says num_hidden_layers: {n})" if isinstance(n, int) else ""


def check_complete(where: str, *, missing: Iterable[str], unused: Iterable[str], model: Any = None,
                   config: Any = None) -> None:
    """Raise when the checkpoint lacks a tensor the config implies, or holds one the model does not use.

    Args:
        where: the model as the user named it (or its folder), for the message.
        missing: tensors the model needs that the checkpoint lacks (tied aliases already resolved).
        unused: tensors the checkpoint holds that no parameter or buffer takes.
        model: the model (or skeleton), whose class may list keys to ignore.
        config: its config, to quote ``num_hidden_layers`` when layers are at fault.

    Raises:
        ModelLoadError: one line naming the first tensors of each kind and how many there are.
    """
    skip_missing, skip_unused = _ignored(model, "missing"), _ignored(model, "unexpected")
    lacks = sorted({k for k in missing if not any(p.search(k) for p in skip_missing)}, key=_natural)
    extra = sorted({k for k in unused if not _UNUSED_OK.search(k) and not any(p.search(k) for p in skip_unused)},
                   key=_natural)
    if not lacks and not extra:
        return
    parts = []
    if lacks:
        parts.append(f"config.json implies {len(lacks)} tensor(s){_layers(lacks)} that the checkpoint lacks ({_listed(lacks)})")
    if extra:
        parts.append(f"the checkpoint holds {len(extra)} tensor(s){_layers(extra)} that the model does not use ({_listed(extra)})")
    layers = _config_layers(config) if config is not None and (_layers(lacks) or _layers(extra)) else ""
    raise ModelLoadError(
        f"{where} does not match its config.json{layers}: {'; '.join(parts)}; refusing to invent or drop weights: "
        "restore the checkpoint's own config.json, or the missing weight files"
    )
