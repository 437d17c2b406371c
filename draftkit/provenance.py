"""``draftkit.json``: what made an artifact, from what, with which settings and versions."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from draftkit._version import __version__

PROVENANCE_FILE = "draftkit.json"


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "draftkit": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# draftkit writes a few levels per stage (a provenance embeds its parent's); a chain of stages stays far below
MAX_DEPTH = 200


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            todo.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            todo.extend((x, d + 1) for x in v)
    return deepest


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """A model folder's ``draftkit.json`` (None when absent or not JSON).

    Raises:
        ModelLoadError: it is nested too deeply to read or to embed in an output's provenance.
    """
    from draftkit.errors import ModelLoadError

    file = Path(path) / PROVENANCE_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except RecursionError:
        data = None
        too_deep = True
    except (OSError, json.JSONDecodeError):
        return None
    else:
        too_deep = _depth(data) > MAX_DEPTH
    if too_deep:
        raise ModelLoadError(f"{file} is nested more than {MAX_DEPTH} levels deep, so it is no draftkit provenance: "
                             "delete it, or restore the folder's own draftkit.json")
    return data


def make_provenance(
    *, stage: str, source: str, arguments: dict[str, Any], facts: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``draftkit.json`` written beside every artifact: what made it, from what, with which settings."""
    parent = read_provenance(source) if Path(str(source)).is_dir() else None
    return {
        "format": "draftkit-provenance/1",
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_model": str(source),
        "versions": versions(),
        "arguments": arguments,
        "facts": facts or {},
        "parent": parent,
    }
