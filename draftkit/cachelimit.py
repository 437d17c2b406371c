"""A size limit for draftkit's cache (``DRAFTKIT_CACHE_LIMIT``, e.g. ``50GB``): the least recently used entries of
its rows, GGUF and eval folders are deleted first. A leaf module: every cache writer may call it."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

ENTRY_KINDS = ("rows", "gguf", "eval")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_limit(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text or "")
    if not m or m.group(2).upper() not in _UNITS:
        from draftkit.errors import InvalidInputError

        raise InvalidInputError(f"DRAFTKIT_CACHE_LIMIT={text!r}: write a size such as 50GB or 500MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def touch(entry: Path) -> None:
    """Mark a cache entry used now (its mtime): every cache hit calls this, so the limit evicts least recently
    used entries, not oldest written. A read-only cache is left as it is."""
    try:
        os.utime(entry)
    except OSError:
        pass


def env_limit() -> int | None:
    """``DRAFTKIT_CACHE_LIMIT`` in bytes (None when unset); a bad value is an InvalidInputError (exit 2). Every
    command checks it before it runs, so a typo fails at once rather than after the first cache write."""
    text = os.environ.get("DRAFTKIT_CACHE_LIMIT")
    return parse_limit(text) if text else None


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def enforce_limit(limit: int | None = None, root: Path | None = None) -> list[Path]:
    """Delete the least recently used cache entries until the cache fits ``limit`` (``DRAFTKIT_CACHE_LIMIT``;
    no limit when unset). Returns what was deleted."""
    from draftkit.atomic import cache_root

    if limit is None:
        limit = env_limit()
        if limit is None:
            return []
    root = root or cache_root()
    entries = [e for kind in ENTRY_KINDS if (root / kind).is_dir() for e in (root / kind).iterdir()
               if not e.name.startswith(".")]
    sized = sorted(((e.stat().st_mtime, _size(e), e) for e in entries), key=lambda t: t[0])
    total = sum(s for _, s, _ in sized)
    gone = []
    for _, size, entry in sized:
        if total <= limit:
            break
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        total -= size
        gone.append(entry)
    return gone
