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
_verbose = False

# Messages from libraries that say nothing the user can act on (shown with --verbose).
HARMLESS_WARNINGS = (
    r".*Removed shared tensor.*",
    r".*Token indices sequence length is longer than the specified maximum sequence length.*",
    r".*`torch_dtype` is deprecated.*",
    r".*generation flags are not valid and may be ignored.*",
    r".*Setting `pad_token_id` to `eos_token_id`.*",
    r".*`past_key_values` is deprecated.*",  # transformers 5.x renames the cache argument; every decode says so
    r".*`is_gradient_checkpointing` is deprecated.*",  # transformers itself when training, and peft on a LoRA run
)
# Log records of other libraries that say nothing the user can act on: (logger, message start).
HARMLESS_RECORDS = (
    ("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`"),
    ("lm_eval.models.huggingface", "Passed an already-initialized model through `pretrained`"),
)


class _DropHarmless:
    """A logging filter: drops the records of :data:`HARMLESS_RECORDS` (kept however the library sets levels)."""

    def filter(self, record) -> bool:
        msg = str(record.msg)
        return not any(record.name == name and msg.startswith(start) for name, start in HARMLESS_RECORDS)


_drop_harmless = _DropHarmless()


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def set_verbose(verbose: bool) -> None:
    """Off (the default): third-party progress bars (transformers' "Loading weights", datasets, hub
    downloads) and known harmless library warnings are silenced; draftkit's own progress stays."""
    global _verbose
    _verbose = verbose
    if verbose:
        return
    import logging
    import warnings

    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                        ("TRANSFORMERS_VERBOSITY", "error"), ("DATASETS_VERBOSITY", "error"),
                        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(name, value)
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for logger in ("transformers", "datasets", "huggingface_hub", "accelerate"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    for name in dict.fromkeys(n for n, _ in HARMLESS_RECORDS):
        if _drop_harmless not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_drop_harmless)
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def verbose() -> bool:
    return _verbose


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
