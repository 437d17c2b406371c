"""Console output: logs and progress go to stderr so ``--json`` keeps stdout machine-readable."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def info(message: str) -> None:
    if not _quiet:
        err.print(message)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}")


def progress_enabled() -> bool:
    if _quiet or os.environ.get("DRAFTKIT_NO_PROGRESS"):
        return False
    return True


def make_progress() -> Progress:
    """A rich progress bar on stderr (transient on a terminal, silent when progress is disabled)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=sys.stderr.isatty(),
        disable=not progress_enabled(),
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr."""
    with make_progress() as progress:
        task = progress.add_task(description, total=total if total is not None else _len(items), status="")
        for item in items:
            yield item
            progress.advance(task)


@contextmanager
def status_bar(description: str, total: int):
    """A progress bar whose status text and advance are driven by the caller: ``bar.update(n, status)``."""
    with make_progress() as progress:
        task = progress.add_task(description, total=total, status="")

        class _Bar:
            def update(self, advance: int = 1, status: str | None = None) -> None:
                kwargs = {"advance": advance}
                if status is not None:
                    kwargs["status"] = status
                progress.update(task, **kwargs)

        yield _Bar()


def _len(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
