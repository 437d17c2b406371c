"""Reuse across nights: what does not change between runs is kept once, by content, in ``DRAFTKIT_CACHE``.

* **Regenerated rows** (distill): keyed by the teacher's identity (name and content), the data's content and
  every setting the rows depend on (template, generation settings, split, columns, limit). A run in another
  folder whose teacher, data and settings did not change starts from these rows instead of regenerating them
  (the resumed rows pass the same staleness check as a resumed work folder). On when ``DRAFTKIT_CACHE`` is set.
* **A size limit** for the cache (``DRAFTKIT_CACHE_LIMIT``, e.g. ``50GB``): the least recently used entries of
  its rows, GGUF and eval folders go first.
* ``keep: final`` (a recipe's header): once the run ends, every stage's model copy but the final draft (and the
  exports) is deleted; reports, manifest and plots stay, so a nightly job does not pile up full copies.

Converted GGUF files (:mod:`draftkit.checkpoint.gguf_cache`) and eval's baseline scores
(:func:`draftkit.evaluate.baseline_results`) are the other content-keyed entries of the same cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

ROWS = "rows"


def rows_enabled() -> bool:
    return bool(os.environ.get("DRAFTKIT_CACHE"))


def rows_key(cfg) -> str:
    """What a regenerated rows file depends on, as one hash."""
    from draftkit._version import __version__
    from draftkit.distill.regenerate import rows_source
    from draftkit.distill.templates import template_hash
    from draftkit.fingerprint import data_identity

    parts: dict[str, Any] = {"teacher": cfg.teacher, **rows_source(cfg), "template": template_hash(cfg.template),
                             "data": data_identity(str(cfg.dataset)), "split": cfg.split, "columns": cfg.columns,
                             "limit": cfg.limit, "version": __version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def restore_rows(cfg, data_dir: Path) -> Path | None:
    """The cache entry of ``cfg``'s rows (None when reuse is off); its rows are copied into an empty
    ``data_dir`` so that regeneration resumes from them."""
    from draftkit import console
    from draftkit.atomic import cache_root
    from draftkit.cachelimit import touch
    from draftkit.distill.regenerate import REPORT_FILE, ROWS_FILE

    if not rows_enabled() or cfg.teacher is None:
        return None
    entry = cache_root() / ROWS / rows_key(cfg)
    if (entry / ROWS_FILE).is_file() and not (data_dir / ROWS_FILE).exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        for name in (ROWS_FILE, REPORT_FILE):
            if (entry / name).is_file():
                shutil.copyfile(entry / name, data_dir / name)
        touch(entry)  # recently used: the size limit evicts it last
        console.info(f"[dim]regenerated rows reused from {entry} (same teacher, data and settings)[/dim]")
    return entry


def keep_rows(entry: Path | None, data_dir: Path) -> None:
    """Store ``data_dir``'s complete rows in the cache entry (once), then hold the cache to its size limit."""
    from draftkit.atomic import atomic_dir
    from draftkit.distill.regenerate import REPORT_FILE, ROWS_FILE
    from draftkit.errors import OutputExistsError

    if entry is None or not (data_dir / ROWS_FILE).is_file() or (entry / ROWS_FILE).is_file():
        return
    try:
        with atomic_dir(entry, overwrite=entry.exists()) as tmp:
            for name in (ROWS_FILE, REPORT_FILE):
                if (data_dir / name).is_file():
                    shutil.copyfile(data_dir / name, tmp / name)
    except (OutputExistsError, OSError):  # another run stored them meanwhile, or a read-only cache
        return
    from draftkit.cachelimit import enforce_limit

    enforce_limit()


def keep_final(run_report: dict[str, Any], out: Path, model_stages: set[str]) -> list[str]:
    """``keep: final``: delete every stage folder holding a model copy (a stage of ``model_stages``) except the
    final draft's (exports and measuring stages' reports stay) and the work folders; returns the folders removed
    (also in the report)."""
    final = str(run_report.get("final_model"))
    removed = []
    for s in run_report.get("stages", []):
        folder = Path(s["dir"])
        if s["stage"] in model_stages and str(folder) != final and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    for work in out.glob("*.work"):
        shutil.rmtree(work, ignore_errors=True)
    run_report["removed"] = removed
    run_report["kept"] = "final"
    return removed
