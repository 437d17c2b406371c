"""Errors that draftkit reports to the user as one line (no traceback unless DRAFTKIT_DEBUG=1).

Exit codes mean something, so CI can tell failures apart:

* 0: success
* 1: unexpected internal error (a bug: please report it with DRAFTKIT_DEBUG=1 output)
* 2: invalid input (bad arguments, recipe, model path, data)
* 3: a quality gate failed (e.g. ``--min-recovery``)
* 130: interrupted (Ctrl-C, SIGINT); whatever was completed is kept
* 143: terminated (SIGTERM: ``timeout``, CI cancel, Kubernetes, Slurm); handled exactly like Ctrl-C
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INVALID_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class DraftkitError(Exception):
    """Base class: an error with a message meant for the user."""

    exit_code = EXIT_INVALID_INPUT


class InvalidInputError(DraftkitError):
    """The user's input (arguments, files, recipe) is wrong; the message says how to fix it."""


class ModelLoadError(InvalidInputError):
    """A model or tokenizer could not be found or loaded."""


class UnsupportedModelError(InvalidInputError):
    """The model's architecture is not one draftkit knows how to edit."""


class DataError(InvalidInputError):
    """A dataset or calibration file is missing, empty, unreadable or lacks the needed columns."""


class OutputExistsError(InvalidInputError):
    """The output path already exists and ``--overwrite`` was not given."""


class NonFiniteError(DraftkitError):
    """A model about to be saved holds NaN or Inf weights (a diverged run); nothing is written."""


class LockedError(InvalidInputError):
    """Another draftkit process holds the lock of an output or work folder."""


class GateFailedError(DraftkitError):
    """A quality gate failed; the run itself completed."""

    exit_code = EXIT_GATE_FAILED


def exit_code_of(exc: BaseException) -> int:
    """The exit code draftkit ends with on ``exc``."""
    if isinstance(exc, DraftkitError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):  # Interrupted: 130 for SIGINT, 143 for SIGTERM
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)
    code = getattr(exc, "exit_code", None)  # click's usage errors
    return code if isinstance(code, int) else EXIT_INTERNAL


def error_object(exc: BaseException | str, exit_code: int | None = None) -> dict:
    """What ``--json`` prints (and a run's report.json holds) when a command fails: never an empty file.

    ``{"passed": false, "gates": [], "error": {"type", "message", "exit_code"}}``."""
    kind = type(exc).__name__ if isinstance(exc, BaseException) else "Error"
    text = str(exc)
    return {"passed": False, "gates": [],
            "error": {"type": kind, "message": text.splitlines()[0] if text else kind,
                      "exit_code": exit_code if exit_code is not None else
                      (exit_code_of(exc) if isinstance(exc, BaseException) else EXIT_INTERNAL)}}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (see :mod:`draftkit.signals`); a ``KeyboardInterrupt``, so every cleanup that
    runs on Ctrl-C runs on both. ``exit_code`` is 128 + the signal number (130, 143)."""

    def __init__(self, signum: int):
        super().__init__(signum)  # args stay (signum,): the exception pickles and unpickles as itself
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        import signal

        return signal.Signals(self.signum).name


# what to lower when a GPU runs out of memory in a command that is not one stage (a stage registers its own:
# draftkit.registry)
OOM_SETTINGS = {
    "run": "the failing stage's sizes in the recipe (prune: batch_size, calib.samples; sparsify: chunk_tokens, "
           "calib.samples; distill: train_batch_size, max_length; eval: batch_size), or set load.stream: on",
}


def out_of_memory_line(exc: BaseException, command: str | None = None, lower: str | None = None) -> str | None:
    """The one line for a GPU out-of-memory error (``torch.OutOfMemoryError``), naming the setting to lower;
    None for any other error. Never imports torch (a command that did not load it raised something else)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not isinstance(exc, torch.OutOfMemoryError):
        return None
    lower = lower or OOM_SETTINGS.get(command or "", "the batch or calibration sizes")
    return f"the GPU ran out of memory{f' in {command}' if command else ''}: lower {lower}, or use --device cpu"
