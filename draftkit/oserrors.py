"""The one place where the user's machine failing an operation becomes a user error (exit 2), not a bug.

A full disk, a read-only file system, an output name too long for the file system, an output under a
regular file, a symlink loop, missing permissions, too many open files: each is an ``OSError`` with its
``errno`` (or, from safetensors' Rust code and torch's C++ writer, a library error whose message carries
the OS's words). :func:`user_error` turns one into a one-line :class:`MachineError` naming the file, what
the system said and how to fix it; anything else is left alone, so a true bug still reports as an internal
error (exit 1). ``handle_errors`` (every command) asks it before calling an exception internal.

Reading a user's broken model files is classified where they are read (:mod:`draftkit.input_errors`).
"""

from __future__ import annotations

import errno
import os

from draftkit.errors import InvalidInputError

_WRITE_ELSEWHERE = "free some space, or write elsewhere (-o; TMPDIR for temporary files)"

# errno -> (what the system said, how to fix it)
_FIXES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", _WRITE_ELSEWHERE),
    errno.EDQUOT: ("disk quota exceeded", _WRITE_ELSEWHERE),
    errno.EFBIG: ("file too large for this file system", "write to a file system that holds large files (-o)"),
    errno.EROFS: ("read-only file system", "write to a folder on a writable file system (-o)"),
    errno.ENAMETOOLONG: ("file name too long for the file system", "choose a shorter output name (-o)"),
    errno.ENOTDIR: ("a part of the path is a regular file, not a folder", "choose a path whose parents are folders (-o)"),
    errno.ELOOP: ("too many levels of symbolic links (a symlink loop)", "fix or remove the link"),
    errno.EACCES: ("permission denied", "fix its permissions or choose a folder you can write to (-o)"),
    errno.EPERM: ("operation not permitted", "fix its permissions or choose a folder you can write to (-o)"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and run again"),
    errno.ENFILE: ("too many open files on this system", "close other programs or raise the system's limit"),
    errno.EIO: ("input/output error", "check the disk or network file system, then run again"),
}

# How libraries that do not raise OSError say the same (Rust's io::Error, torch's C++ stream writer).
_PATTERNS: list[tuple[str, int]] = [
    ("No space left on device", errno.ENOSPC), ("StorageFull", errno.ENOSPC), ("os error 28", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT), ("os error 122", errno.EDQUOT),
    ("Read-only file system", errno.EROFS), ("ReadOnlyFilesystem", errno.EROFS), ("os error 30", errno.EROFS),
    ("File name too long", errno.ENAMETOOLONG), ("os error 36", errno.ENAMETOOLONG),
    ("File too large", errno.EFBIG), ("os error 27", errno.EFBIG),
    ("Too many open files", errno.EMFILE), ("os error 24", errno.EMFILE),
]


class MachineError(InvalidInputError):
    """The user's machine refused an operation (full disk, read-only file system...); the message says the fix."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        # only what it was raised from: an exception raised while handling another (__context__) may be a bug
        exc = exc.__cause__  # type: ignore[assignment]


def _classify(exc: BaseException) -> tuple[int, str | None] | None:
    if isinstance(exc, OSError) and exc.errno in _FIXES:
        return exc.errno, exc.filename
    if isinstance(exc, FileExistsError) and exc.filename and os.path.lexists(exc.filename) \
            and not os.path.isdir(exc.filename):  # mkdir -p through a regular file
        return errno.ENOTDIR, exc.filename
    if not _speaks_for_the_os(exc):  # any other exception's text may hold these words by chance
        return None
    text = str(exc)
    for needle, code in _PATTERNS:
        if needle in text:
            return code, None
    if "PytorchStreamWriter failed writing file" in text:  # torch.save gives no reason: almost always a full disk
        return errno.ENOSPC, None
    return None


def _speaks_for_the_os(exc: BaseException) -> bool:
    """A library error that carries the OS's words in its text: safetensors' Rust errors, torch's RuntimeError."""
    if isinstance(exc, RuntimeError):
        return True
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return False
    return isinstance(exc, SafetensorError)


def user_error(exc: BaseException) -> MachineError | None:
    """The user error ``exc`` stands for (it, or an exception it was raised from, is the machine refusing an
    operation), or None when it is not one (a bug: keep it an internal error)."""
    for link in _chain(exc):
        found = _classify(link)
        if found is not None:
            code, filename = found
            said, fix = _FIXES[code]
            if code == errno.ENOSPC and filename is None and "PytorchStreamWriter" in str(link):
                said = "writing a file failed (a full disk?)"
            where = f"{filename}: " if filename else ""
            return MachineError(f"{where}{said}: {fix}", code)
    return None
