"""Atomic file and directory writes: outputs appear whole or not at all, and ``--overwrite`` can only
ever replace what draftkit itself wrote.

Rules for an output directory (:func:`check_output_dir`, checked before anything loads or is deleted):

* never ``.``/``..``/``~``, a filesystem root, the home folder or any folder above the current one;
* never the input, inside the input, or a folder that contains the input or any other model or data
  argument of the command (teacher, dataset, calibration file, baseline, target, prompts);
* an existing folder is replaced only with ``--overwrite``, and only when it is empty or is itself a
  draftkit output (it holds ``draftkit.json``, a run's ``manifest.json`` or a report with provenance);
* the old output is removed only after the new one is complete: the new one is written beside it,
  the old one renamed aside, the new one renamed in, then the old one deleted.

Outputs get the permissions of any file the user creates (the umask), not ``mkdtemp``'s 0700.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from draftkit.errors import InvalidInputError, OutputExistsError
from draftkit.provenance import PROVENANCE_FILE


def cache_root() -> Path:
    """draftkit's cache folder (eval baselines, content hashes): ``$DRAFTKIT_CACHE_DIR`` (``$DRAFTKIT_CACHE`` is
    read too), else ``~/.cache/draftkit``."""
    env = os.environ.get("DRAFTKIT_CACHE_DIR") or os.environ.get("DRAFTKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "draftkit"


MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".draftkit.lock"  # draftkit.lock.LOCK_FILE
REPORT_FILE = "report.json"
# Keys of stage configs that name outputs, not inputs: never treated as something to protect.
_OUTPUT_KEYS = frozenset({"work_dir", "output", "plot"})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, *, directory: bool) -> None:
    """Give ``path`` the mode a plain ``mkdir``/``open`` would have (0777/0666 minus the umask)."""
    try:
        os.chmod(path, (0o777 if directory else 0o666) & ~_umask())
    except OSError:  # e.g. a filesystem without modes; the default is still usable
        pass


def _umask_modes(root: Path) -> None:
    """Every file and folder under ``root`` gets the umask's mode: libraries that write through a private
    temporary file (safetensors' 0600) would otherwise leave outputs unreadable to the user's group."""
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_dir():
            _chmod_default(p, directory=True)
        elif p.is_file() and not p.stat().st_mode & 0o111:
            _chmod_default(p, directory=False)


def is_draftkit_output(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder draftkit wrote: a model/export with ``draftkit.json``, a run folder
    with its ``manifest.json``, a measuring stage's ``report.json`` with provenance, or the rows folder of
    ``distill regenerate``."""
    p = Path(path)
    if (p / PROVENANCE_FILE).is_file():
        return True
    for name, key in ((MANIFEST_FILE, "stages"), (REPORT_FILE, "provenance")):
        try:
            data = json.loads((p / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and key in data:
            return True
    try:  # the rows folder of `distill regenerate`, finished or killed half-way
        with open(p / "rows.jsonl", encoding="utf-8") as f:
            first = json.loads(f.readline() or "{}")
        return isinstance(first, dict) and "template_hash" in first
    except (OSError, ValueError):
        return False


def _protected(resolved: Path) -> str | None:
    """Why ``resolved`` may never be an output folder, or None."""
    if resolved == Path(resolved.anchor):
        return "a filesystem root"
    home = Path.home().resolve()
    cwd = Path.cwd().resolve()
    if resolved == home:
        return "your home folder"
    if resolved == cwd:
        return "the current folder"
    if resolved in cwd.parents:
        return "a folder above the current one"
    if resolved in home.parents:
        return "a folder above your home folder"
    return None


def config_paths(cfg: Any) -> list[str]:
    """Every local path that a stage config (a pydantic model or a dict) names as an input: teacher,
    dataset, calibration file, baseline, target, prompts, template file... (output keys excluded)."""
    data = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else cfg
    found: list[str] = []

    def walk(v: Any, key: str = "") -> None:
        if key in _OUTPUT_KEYS:
            return
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, str(k))
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, key)
        elif isinstance(v, str) and v and "\n" not in v and len(v) < 4096:
            base = v.split(":", 1)[0] if not Path(v).exists() else v  # "owner/name:config" stays a hub id
            if Path(base).exists():
                found.append(base)

    walk(data)
    return found


def check_output_dir(out: str | os.PathLike, *, overwrite: bool, inputs: Iterable[Any] = ()) -> Path:
    """Refuse an output that could destroy the user's work, before anything is loaded or deleted.

    ``inputs`` are the command's model and data arguments (paths, hub ids and names are ignored unless
    they exist locally). Returns ``out`` as a Path. See the module docstring for the rules.
    """
    raw = str(out)
    out = Path(raw).expanduser() if raw.startswith("~") else Path(raw)
    if raw.strip() == "":
        raise InvalidInputError("output is empty: name a new folder with -o")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise InvalidInputError(f"output {raw} is under {parent}, a file, not a folder: choose another -o")
    resolved = out.resolve()
    why = _protected(resolved)
    if why is not None:
        raise InvalidInputError(f"output {raw} is {why}: draftkit writes a new folder there and never replaces "
                                f"this one; name a new folder, e.g. -o {raw.rstrip('/') + '/draftkit-out' if raw not in ('.', './') else 'draft-out'}")
    for src in inputs:
        if src is None or str(src) == "" or not Path(str(src)).exists():
            continue
        s = Path(str(src)).resolve()
        if s == resolved:
            raise InvalidInputError(f"output {raw} is the input {src}; draftkit never overwrites its input: choose another -o")
        if s in resolved.parents:
            raise InvalidInputError(f"output {raw} is inside the input {src}: choose another -o")
        if resolved in s.parents:
            raise InvalidInputError(f"output {raw} contains the input {src}; replacing it would delete the input: "
                                    "choose another -o")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputExistsError(f"output {raw} exists and is not a directory: choose another -o")
        if not overwrite:
            raise OutputExistsError(f"output {raw} already exists: pass --overwrite to replace it, or choose another -o")
        _check_replaceable(out, raw)
    return out


def _check_replaceable(out: Path, raw: str | None = None) -> None:
    if out.is_symlink():
        raise OutputExistsError(f"output {raw or out} is a symbolic link; --overwrite never replaces one: choose another -o")
    if any(p.name != LOCK_FILE for p in out.iterdir()) and not is_draftkit_output(out):
        raise OutputExistsError(
            f"output {raw or out} is not a draftkit output (no draftkit.json or manifest.json in it) and is not "
            "empty; --overwrite replaces only folders draftkit wrote: choose another -o"
        )


def make_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p`` that returns the Path (permissions from the umask)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it is renamed to ``out``.

    On any error (or Ctrl-C) the temporary directory is removed and ``out`` is untouched. With
    ``overwrite`` an existing ``out`` (empty or a draftkit output, checked again here) is renamed aside,
    the new one renamed in, and only then is the old one deleted.
    """
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise InvalidInputError(f"output {out} names no new folder: choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    _chmod_default(tmp, directory=True)
    try:
        yield tmp
        _umask_modes(tmp)
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise OutputExistsError(f"output {out} appeared while writing: pass --overwrite to replace it")
            _check_replaceable(out)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (mode from the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _chmod_default(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=_json_default)
