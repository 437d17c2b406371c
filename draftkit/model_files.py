"""The one resolver of the files draftkit reads from a model folder.

A model folder downloaded from anywhere must never make draftkit open a file outside it. Every reader
(whole loads, layer streaming, the copy-only prune, sparse-export reading and decompressing, the GGUF
reader, hub-cache snapshots, ``inspect``, the fingerprint of ``run``) gets its paths from here:

* :func:`resolve_file` turns a name written inside the folder (a shard-index entry, a file found in it)
  into a path, refusing absolute names, ``..``, and symlinks that resolve outside the folder or loop;
* :func:`check_folder` applies it to the folder's top-level files and to every entry of its safetensors
  index, so a hostile folder is refused by name resolution, before any command reads a byte of weights.

The boundary is what the user named: a model directory (itself possibly a symlink), a ``.gguf`` file's
folder, or, for a snapshot in the Hugging Face hub cache (``models--o--n/snapshots/REV/``, whose files
are links into ``../../blobs``), the repository's cache folder. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from draftkit.errors import ModelLoadError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"  # transformers reads .bin shards (weights_only) through it
# files transformers may read beside a .gguf file (tokenizer and generation configs, chat template)
_GGUF_SIDE_FILES = (".json", ".jinja", ".model", ".txt")


def folder_root(directory: str | os.PathLike) -> Path:
    """The folder the model's files must resolve into (see the module docstring), resolved."""
    d = Path(directory)
    try:
        real = d.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"{d}: cannot resolve the model folder ({exc.__class__.__name__}: {exc}): "
                             "check the path (a symlink loop?)") from None
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent  # hub cache: snapshots/REV/x -> ../../blobs/SHA
    return real


def _is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_file(directory: str | os.PathLike, name: str, *, source: str | os.PathLike | None = None,
                 root: Path | None = None) -> Path:
    """``directory / name``, checked: the path to open for a file a model folder names.

    Args:
        directory: the model folder.
        name: a relative name written in the folder (``model-00001-of-00002.safetensors``).
        source: the file that wrote ``name`` (the index), for the message; the folder by default.
        root: :func:`folder_root` of ``directory``, when the caller has it already.

    Raises:
        ModelLoadError: ``name`` is absolute, holds ``..``, or resolves (through symlinks) outside the
            model folder or into a symlink loop; the message names the file and the fix.
    """
    d = Path(directory)
    where = source or d
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ModelLoadError(f"{where} names the file {name!r}, which is not a file name: restore the checkpoint's own index")
    posix = PurePosixPath(name)
    if posix.is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise ModelLoadError(f"{where} names the absolute path {name}: a model folder may only name files inside itself "
                             "(refused; restore the checkpoint's own index)")
    if ".." in posix.parts or ".." in PureWindowsPath(name).parts:
        raise ModelLoadError(f"{where} names {name}, which points outside the model directory {d} "
                             "(refused; restore the checkpoint's own index)")
    root = root or folder_root(d)
    path = d / name
    try:
        try:
            real = path.resolve(strict=True)
        except FileNotFoundError:
            real = path.resolve(strict=False)  # absent (or a dangling link): the caller reports a missing file
    except (OSError, RuntimeError):
        raise ModelLoadError(f"{path} is a symlink loop: replace it with the file it should be") from None
    if not _is_inside(real, root):
        raise ModelLoadError(f"{path} is a symlink to {real}, outside the model directory {root}: refused "
                             "(copy the file into the folder, or pass the folder it belongs to)")
    return path


def index_names(directory: str | os.PathLike, index_name: str = SAFE_INDEX) -> list[str] | None:
    """The distinct file names of an index's weight map (``model.safetensors.index.json`` by default), in
    order; None without that index.

    Raises:
        ModelLoadError: the index is not a JSON object with a ``weight_map`` of names.
    """
    index = Path(directory) / index_name
    if not index.is_file():
        return None
    resolve_file(directory, index_name)
    try:
        names = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        text = str(exc).strip().splitlines()
        why = text[0][:300] if text else type(exc).__name__
        raise ModelLoadError(f"{index} is not a checkpoint index (a JSON object with a weight_map): {why}") from None
    for n in names:
        if not isinstance(n, str):
            raise ModelLoadError(f"{index} is not a checkpoint index: its weight_map maps a tensor to {n!r}, not a file name")
    return names


def check_folder(directory: str | os.PathLike) -> None:
    """Refuse a model folder that would make draftkit (or transformers) open a file outside it: a
    top-level entry that is a symlink resolving outside the folder or looping, or an index entry
    that is absolute, holds ``..`` or resolves outside. Dot-files are not read and not checked."""
    d = Path(directory)
    root = folder_root(d)
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError as exc:
        raise ModelLoadError(f"{d}: cannot list the model folder ({exc.strerror or exc}): check its permissions") from None
    for entry in entries:
        if not entry.name.startswith(".") and entry.is_symlink():
            resolve_file(d, entry.name, root=root)
    for index in (SAFE_INDEX, BIN_INDEX):
        for n in index_names(d, index) or []:
            resolve_file(d, n, source=d / index, root=root)


def check_gguf(file: str | os.PathLike) -> None:
    """A ``.gguf`` file named by the user: the configs beside it that transformers may read must not
    link outside its folder, and the file itself must not be a symlink loop. A symlink the user names
    directly is followed: the user chose it."""
    f = Path(file)
    try:
        f.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ModelLoadError(f"{f} is a symlink loop or cannot be resolved: pass the real .gguf file") from None
    parent = f.parent
    root = folder_root(parent)
    for entry in sorted(os.scandir(parent), key=lambda e: e.name):
        if entry.is_symlink() and entry.name.endswith(_GGUF_SIDE_FILES):
            resolve_file(parent, entry.name, root=root)
