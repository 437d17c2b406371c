"""A command's inputs, named as inputs before its output is looked at and before any weights load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


def looks_local(source: str) -> bool:
    """A data source meant as a file (not a hub dataset id ``owner/name[:config]``)."""
    p = Path(source).expanduser()
    return p.exists() or p.suffix.lower() in DATA_SUFFIXES or source.startswith((".", "/", "~"))


def check_inputs(stage: str, model_name: str, cfg: Any) -> None:
    """The model resolves, every other model the stage's config names resolves, and every local data file it
    names exists: a mistyped path is reported as such, not as "output exists", and not after a model loaded.

    Raises:
        ModelLoadError, DataError: one line naming the input.
    """
    from draftkit.errors import DataError
    from draftkit.fingerprint import get_field
    from draftkit.refs import resolve_model_ref
    from draftkit.registry import stage as registered

    resolve_model_ref(model_name)
    data = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else cfg
    entry = registered(stage)
    for field, kind in entry.reference_fields(data) if entry is not None else ():
        value = get_field(data, field)
        if not isinstance(value, str) or not value:
            continue
        if kind == "model":
            resolve_model_ref(value)
        elif kind == "data" and looks_local(value) and not Path(value).expanduser().exists():
            raise DataError(f"{field.split('.')[0]} file {value} does not exist")
