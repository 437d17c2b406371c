"""One path for hard stops: SIGINT (Ctrl-C) and SIGTERM (what ``timeout``, CI runners, Kubernetes and Slurm
send on cancel) both raise :class:`~draftkit.errors.Interrupted`, a ``KeyboardInterrupt``.

So a SIGTERM unwinds exactly as Ctrl-C does: ``finally`` blocks and ``except BaseException`` handlers run,
temporary folders are removed, the run's manifest marks the stage ``interrupted``, the folder lock is released
and its file removed, and the command prints one line and exits ``128 + signal`` (130 for SIGINT, 143 for
SIGTERM), as a shell reports a process the signal killed. A second signal while that cleanup runs is ignored
(the cleanup takes moments); SIGKILL cannot be caught, and what it leaves is handled by the next run (stale
temporary folders removed, the dead holder's flock already released by the kernel).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from draftkit.errors import Interrupted

HANDLED = (signal.SIGINT, signal.SIGTERM)
_state = {"stopping": False}


def _handler(signum, frame) -> None:
    if _state["stopping"]:
        return  # already unwinding from the first signal: let the cleanup finish
    _state["stopping"] = True
    raise Interrupted(signum)


@contextmanager
def stops_as_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (main thread only; elsewhere a no-op).
    The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    _state["stopping"] = False
    for s in HANDLED:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _state["stopping"] = False
