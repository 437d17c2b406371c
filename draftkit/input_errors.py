"""The one place where a library's failure to parse a user's input file becomes a user error.

safetensors, json, pickle/torch.load and the file system fail on broken input files with their own
exception types (``SafetensorError``, ``RecursionError``, ``UnpicklingError``, ``RuntimeError``,
``OSError`` ``ELOOP``...). Read inside :func:`reading`, any of them becomes one
:class:`~draftkit.errors.ModelLoadError` line naming the file and the fix (exit 2): a truncated or
tampered input is the user's file, not a draftkit bug. Keep each ``with reading(...)`` tight around the
library call that parses the file, so that draftkit's own bugs still surface as internal errors.

(Failures to *write* outputs: ENOSPC, EROFS, names too long, are classified with the output code.)
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from draftkit.errors import DraftkitError, ModelLoadError

# Exceptions a parser raises on a malformed file, by class name (importing safetensors or torch here
# would make every command pay for it; safetensors' class lives in a private extension module).
_PARSE_ERRORS = {"SafetensorError", "UnpicklingError", "JSONDecodeError", "UnicodeDecodeError", "EOFError",
                 "RecursionError", "BadZipFile", "GGUFReadError"}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def is_parse_error(exc: BaseException) -> bool:
    """True for an exception a library raises because the bytes it read are not what they should be."""
    if any(cls.__name__ in _PARSE_ERRORS for cls in type(exc).__mro__):
        return True
    if isinstance(exc, OSError):  # a link loop, an I/O error, a file that vanished or cannot be read
        return exc.errno in (errno.ELOOP, errno.EIO, errno.ENOENT, errno.EACCES, errno.EISDIR, errno.ENOTDIR) \
            or exc.errno is None
    if isinstance(exc, RuntimeError):  # torch.load on a torn archive, a storage too small for its tensor
        text = str(exc)
        return any(s in text for s in ("PytorchStreamReader", "zip archive", "storage", "Weights only load failed",
                                       "unexpected EOF", "file not found", "invalid header", "out of bounds"))
    return isinstance(exc, (ValueError, KeyError, IndexError, TypeError))


def describe(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "it is nested too deeply to read"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "it is a symlink loop"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return first_line(exc)


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str, fix: str = "copy or download it again") -> Iterator[None]:
    """Turn a parse failure of ``path`` (a ``what``: "safetensors file", "training checkpoint"...) into
    ``ModelLoadError("{path} is not a readable {what} ({why}): {fix}")``; anything else passes through."""
    try:
        yield
    except DraftkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised when not the file's fault
        if not is_parse_error(exc):
            raise
        raise ModelLoadError(f"{path} is not a readable {what} ({describe(exc)}): {fix}") from exc
