"""What a stage's output depends on, as one hash: resume reuses an output only when nothing it depends on changed.

A stage's fingerprint covers its config, the ``load`` block (execution options), the content of the model it
reads, the identity and content of every other model it reads (distill's teacher, eval's baseline, spec's
target), the content of its data files (calibration, dataset, prompts, perplexity text, templates), and the
fingerprint of the stage before it, so a change anywhere reruns that stage and every later one.

Content hashes read every byte (sha256) once; the result is cached per file by (size, mtime, inode) in
``~/.cache/draftkit/content-hashes.json`` (``DRAFTKIT_CACHE_DIR`` moves it, like the eval cache), so an unchanged 16 GB model is not
re-read on each run. A hub id is identified by the commit of its snapshot in the local hub cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 1 << 22


def _cache_path() -> Path:
    from draftkit.atomic import cache_root

    return cache_root() / "content-hashes.json"


class _HashCache:
    def __init__(self) -> None:
        self.path = _cache_path()
        try:
            self.data: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    def file_hash(self, f: Path) -> str:
        st = f.stat()
        key = str(f.resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.data.get(key)
        if isinstance(hit, dict) and hit.get("stamp") == stamp:
            return hit["sha256"]
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
        digest = h.hexdigest()
        self.data[key] = {"stamp": stamp, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            from draftkit.atomic import atomic_write_text

            atomic_write_text(self.path, json.dumps(self.data))
        except OSError:  # a read-only home: hashes are recomputed next time, nothing else changes
            pass
        self.dirty = False


_cache: _HashCache | None = None


def _hash_cache() -> _HashCache:
    global _cache
    if _cache is None or _cache.path != _cache_path():
        _cache = _HashCache()
    return _cache


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of one file's bytes, whatever its name (cached by size, mtime and inode like :func:`content_hash`)."""
    cache = _hash_cache()
    digest = cache.file_hash(Path(path))
    cache.save()
    return digest


def content_hash(path: str | os.PathLike, *, model: bool = False) -> str:
    """sha256 over the names and bytes of a file or of every file in a folder (dot-files excluded).

    ``model``: the folder is a model folder, whose files are read only when they resolve inside it
    (:mod:`draftkit.model_files`; a link out of one of its subfolders is skipped, never opened)."""
    _hash_cache()
    assert _cache is not None
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if model and p.is_dir():
        from draftkit.model_files import folder_root

        root = folder_root(p)
        files = [f for f in files if _resolves_inside(f, root)]
    for f in files:
        rel = f.name if f == p else str(f.relative_to(p))
        h.update(f"{rel}\0{_cache.file_hash(f)}\0".encode())
    _cache.save()
    return h.hexdigest()[:16]


def _resolves_inside(f: Path, root: Path) -> bool:
    try:
        real = f.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return real == root or root in real.parents


def _hub_commit(repo_id: str, repo_type: str) -> str | None:
    """The commit of the snapshot of ``repo_id`` in the local hub cache (None when not cached)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)).name
    except Exception:  # noqa: BLE001
        return None


def model_identity(name: str) -> str:
    """``name`` plus its content: a local folder's content hash, or a hub id's cached commit."""
    from draftkit.errors import DraftkitError
    from draftkit.refs import resolve_model_ref

    try:
        ref = resolve_model_ref(name)
    except DraftkitError:
        return f"unresolved:{name}"
    if ref.local:
        return f"{name}@{content_hash(ref.location, model=True)}"
    return f"{name}=hub:{ref.location}@{_hub_commit(ref.location, 'model') or 'uncached'}"


def data_identity(source: str) -> str:
    """A local data file (or folder) by content; a hub dataset by its cached commit."""
    p = Path(source).expanduser()
    if p.exists():
        return f"{source}@{content_hash(p)}"
    name, _, config = source.partition(":")
    return f"hub:{source}@{_hub_commit(name, 'dataset') or 'uncached'}"


def get_field(data: dict, dotted: str) -> Any:
    """``data`` at a dotted path (``calib.path``); None where a part is missing."""
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def references(stage: str, config: dict[str, Any]) -> dict[str, str]:
    """Identity and content of every model and data source a stage's config names (besides its input), as the
    stage registers them (:mod:`draftkit.registry`)."""
    from draftkit.registry import stage as registered

    entry = registered(stage)
    out: dict[str, str] = {}
    for field, kind in entry.reference_fields(config) if entry is not None else ():
        value = get_field(config, field)
        if isinstance(value, str) and value:
            out[field] = {"model": model_identity, "data": data_identity}.get(kind, text_identity)(value)
    return out


def text_identity(text: str) -> str:
    """A setting that is itself content (distill's inline template): its hash."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_fingerprint(*, stage: str, config: dict[str, Any], load: dict[str, Any], input_id: str,
                      previous: str | None) -> tuple[str, dict[str, Any]]:
    """``(fingerprint, parts)``: the hash resume compares, and what went into it (to say why a stage reruns).
    Gate thresholds are left out: they judge the output and do not change it (:mod:`draftkit.gates`)."""
    from draftkit.gates import without_gates

    config = without_gates(stage, config)
    parts = {
        "config": hashlib.sha256(json.dumps({"stage": stage, "config": config}, sort_keys=True).encode()).hexdigest()[:16],
        "load": hashlib.sha256(json.dumps(load, sort_keys=True).encode()).hexdigest()[:16],
        "input": input_id,
        "references": references(stage, config),
        "previous": previous,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return digest, parts


def explain(parts: dict[str, Any], before: dict[str, Any] | None) -> str:
    """Why a stage whose fingerprint changed must rerun, in words."""
    if not before:
        return "never run"
    why = []
    if parts["config"] != before.get("config"):
        why.append("its settings changed")
    if parts["load"] != before.get("load"):
        why.append("the load block changed")
    if parts["input"] != before.get("input"):
        why.append("its input model changed")
    old_refs = before.get("references") or {}
    for k, v in parts["references"].items():
        if old_refs.get(k) != v:
            why.append(f"{k} changed")
    for k in old_refs.keys() - parts["references"].keys():
        why.append(f"{k} removed")
    if not why and parts["previous"] != before.get("previous"):
        why.append("an earlier stage changed")
    return ", ".join(why) or "changed"


def decide(out: Path, prev: dict[str, Any], fp: str, parts: dict[str, Any], forced: bool = False) -> tuple[bool, str]:
    """(reuse the saved output ``out``?, why), from its manifest entry ``prev`` and today's fingerprint: a recipe's
    stages (:mod:`draftkit.pipeline`) and a search's steps (:mod:`draftkit.search`) alike."""
    if forced:
        return False, "--from"
    if prev.get("status") not in ("done", "gate_failed"):
        return False, {None: "never run", "running": "killed before it finished",
                       "failed": "failed last time", "interrupted": "interrupted last time"}.get(prev.get("status"), "not finished")
    if "fingerprint" not in prev:
        return False, "made by an older draftkit (no fingerprint)"
    if not out.exists():
        return False, "its output is missing"
    if prev.get("fingerprint") != fp:
        return False, explain(parts, prev.get("parts"))
    return True, "unchanged"
