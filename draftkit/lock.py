"""One process per folder: an exclusive lock file inside a run's output folder or a stage's work folder.

``draftkit run`` holds ``OUTPUT/.draftkit.lock`` for the whole run, and a stage that resumes from a work
folder (distill's regenerated rows and checkpoints, ``distill regenerate``'s output) holds one there, so two
runs can never interleave their writes. A second process gets one line naming the holder's PID (exit 2).

The lock is an OS advisory lock (``fcntl.flock``) on the file, which the kernel releases when the holder
dies however it dies (SIGKILL, OOM, power loss of a container), so a lock left by a killed process is
stale by construction: the next run takes it over and writes its own PID. A holder that ends normally (or
on SIGINT/SIGTERM) removes the file while it still holds the lock; a process that opened the file just
before checks after taking the flock that the path still names that file, and opens it again if not. Where ``fcntl`` does not exist
(Windows), the file is created exclusively and a stale one is detected by checking whether its PID is alive.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from draftkit.atomic import LOCK_FILE
from draftkit.errors import LockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(folder: Path, path: Path, what: str) -> LockedError:
    h = _holder(path)
    pid = h.get("pid", "unknown")
    host = f" on {h['host']}" if h.get("host") and h.get("host") != socket.gethostname() else ""
    since = f" since {h['started']}" if h.get("started") else ""
    return LockedError(
        f"{folder} is in use by another draftkit {h.get('what', what)} (PID {pid}{host}{since}): wait for it to "
        f"finish, stop it, or choose another output"
    )


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` (created if needed) for the ``with`` block.

    Raises:
        LockedError: another live process holds it (the message names its PID).
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    try:
        with _locked(folder, path, what):
            yield
    finally:
        if created:  # a folder made only to hold the lock is not left behind (nothing written)
            try:
                if not any(folder.iterdir()):  # the lock file went with the lock
                    folder.rmdir()
            except OSError:
                pass


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the open file ``fd`` (not removed, not replaced by a newer lock file)."""
    try:
        st, now = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _flock(folder: Path, path: Path, what: str) -> int:
    """Open ``path`` and take its exclusive flock; the descriptor. A lock file its holder removed between our
    open and our flock is a dead end (a third process may create and lock a new one): open it again."""
    assert fcntl is not None
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _busy(folder, path, what) from None
        if _same_file(fd, path):
            return fd
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    raise _busy(folder, path, what)


@contextmanager
def output_lock(out: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock of an output that a command replaces whole (``-o OUT``, with or without ``--overwrite``):
    ``.OUT.draftkit.lock`` beside it, since ``OUT`` itself is renamed in at the end. Two processes writing the
    same output: the second gets one line naming the first's PID instead of both succeeding, the last one
    silently winning. Folders made only to hold the lock are removed again when nothing else came into them.

    Raises:
        LockedError: another live process writes this output.
    """
    out = Path(out)
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(out, out.parent / f".{out.name}{LOCK_FILE}", what):
            yield
    finally:
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


@contextmanager
def _locked(folder: Path, path: Path, what: str) -> Iterator[None]:
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if fcntl is not None:
        fd = _flock(folder, path, what)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, info.encode())
            yield
        finally:
            # removed while still held: a process that opened it meanwhile finds, once it has the flock,
            # that the path no longer names its file, and starts again (see _flock)
            if _same_file(fd, path):
                path.unlink(missing_ok=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    # pragma: no cover - the portable fallback
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            pid = _holder(path).get("pid")
            if isinstance(pid, int) and _pid_alive(pid) and pid != os.getpid():
                raise _busy(folder, path, what) from None
            path.unlink(missing_ok=True)  # stale: its holder is gone
    else:
        raise _busy(folder, path, what)
    try:
        os.write(fd, info.encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)


def output_lock_of(out: Path, what: str, *, held: bool = False):
    """The lock of a command's output (:func:`draftkit.lock.output_lock`); rank 0 alone holds it. ``held``: a
    lock above it (a recipe run's) already covers it."""
    from contextlib import nullcontext

    if held or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0):
        return nullcontext()
    return output_lock(out, what)


def work_dir_lock(cfg, what: str):
    """The lock of a stage's resumable work folder (``cfg.work_dir``), or a no-op when it has none."""
    from contextlib import nullcontext

    work = getattr(cfg, "work_dir", None)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return nullcontext()  # accelerate/torchrun: the processes of one run share the folder; rank 0 holds it
    return folder_lock(work, what) if work else nullcontext()
