"""How many CPU threads torch uses, chosen so that a shared machine does not collapse.

torch's default is one intra-op thread per core. When another process is busy on the same cores,
those threads wait on each other at every parallel region and a run slows down several times
(benchmarks/threads.py measured it; the README's table). The default here, ``auto``, is the number of
cores this process may use minus the cores other processes keep busy (sampled by psutil for
0.2 s when the process starts), at least 1. ``--threads N`` on every command, ``load.threads`` in a recipe or ``DRAFTKIT_THREADS``
set it explicitly.
"""

from __future__ import annotations

import os

ENV = "DRAFTKIT_THREADS"
_applied: int | None = None
_cli_choice: int | None = None  # --threads on the command line wins over a recipe's load.threads


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def busy_cores(sample_seconds: float = 0.2) -> float:
    """How many cores other processes keep busy right now: the machine's CPU use sampled over ``sample_seconds``
    by psutil (this process sleeps meanwhile), else the 1-minute load average (which lags by a minute)."""
    try:
        import psutil

        return (psutil.cpu_count() or os.cpu_count() or 1) * psutil.cpu_percent(interval=sample_seconds) / 100
    except (ImportError, OSError):
        pass
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def auto_threads(cpus: int | None = None, busy: float | None = None) -> int:
    """Cores this process may use minus those other processes keep busy (rounded), at least 1."""
    cpus = available_cpus() if cpus is None else cpus
    busy = busy_cores() if busy is None else busy
    return max(1, min(cpus, cpus - int(busy + 0.5)))


def resolve_threads(threads: int | str | None = None) -> int:
    """An explicit count, else ``DRAFTKIT_THREADS``, else ``OMP_NUM_THREADS``, else :func:`auto_threads`
    (``0``/``auto`` mean auto)."""
    if _cli_choice is not None:
        return _cli_choice
    value = threads if threads not in (None, "", 0, "0") else os.environ.get(ENV) or os.environ.get("OMP_NUM_THREADS")
    if value in (None, "", 0, "0", "auto"):
        return auto_threads()
    try:
        n = int(value)
    except (TypeError, ValueError):
        from draftkit.errors import InvalidInputError

        raise InvalidInputError(f"threads must be a positive integer or auto (got {value!r})") from None
    if n < 1:
        from draftkit.errors import InvalidInputError

        raise InvalidInputError(f"threads must be a positive integer or auto (got {value!r})")
    return n


def apply_threads(threads: int | str | None = None) -> int:
    """Set torch's intra-op threads (and OMP/MKL for child processes); returns the count used."""
    global _applied
    n = resolve_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _applied = n
    return n


def set_default(threads: int | str | None) -> int:
    """The command line's choice (``--threads``, or auto): recorded for the stage code, and for torch
    through ``OMP_NUM_THREADS`` when torch is not imported yet (so a command that never needs torch
    does not import it)."""
    import sys

    global _cli_choice
    if threads not in (None, "", 0, "0", "auto"):
        _cli_choice = resolve_threads(threads)
        os.environ[ENV] = str(_cli_choice)
    if "torch" in sys.modules:
        return apply_threads(threads)
    n = resolve_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    return n
