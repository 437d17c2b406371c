"""Shared option aliases, config building and one-line error handling for every command."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, Field, ValidationError
from rich.markup import escape

from draftkit import console
from draftkit.atomic import to_json
from draftkit.cli._options import Fields
from draftkit.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    DraftkitError,
    InvalidInputError,
    error_object,
    out_of_memory_line,
)
from draftkit.oserrors import user_error
from draftkit.signals import stops_as_interrupts

# ---- what every stage command takes besides its config: one place, so all spell them the same ----
ModelArg = Annotated[str, typer.Argument(help="local model directory, .gguf file, alias (see `draftkit models`) or hub id", show_default=False)]


class Output(BaseModel):
    """Where a command writes and how it prints: ``-o/--output``, ``--overwrite``, ``--json``, ``-q/--quiet``."""

    output: Path | None = Field(None, description="output directory (default: in the current folder, named after the input and the stage, e.g. MODEL-prune)")
    overwrite: bool = Field(False, description="replace the output directory if it exists")
    as_json: bool = Field(False, description="print the report as JSON on stdout (logs go to stderr)")
    quiet: bool = Field(False, description="no progress bars or logs")


class ReportOutput(Output):
    """:class:`Output` of a measuring command (eval, spec): ``-o`` is optional, for report.json only."""

    output: Path | None = Field(None, description="also write report.json into this directory")


# config_options(..., io=OUTPUT): the command receives an Output as ``io``
OUTPUT = Fields(Output, rename={"as_json": "json"}, short={"output": "-o", "quiet": "-q"}, as_model=True)
REPORT_OUTPUT = dataclasses.replace(OUTPUT, model=ReportOutput)
JsonOpt = Annotated[bool, typer.Option("--json", help=Output.model_fields["as_json"].description)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help=Output.model_fields["quiet"].description)]


M = TypeVar("M", bound=BaseModel)


def build(model_cls: type[M], where: str = "", **values: Any) -> M:
    """Validate ``values`` into ``model_cls``; an invalid value becomes one line naming the setting."""
    try:
        return model_cls(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise InvalidInputError(format_validation_error(exc, where)) from None


def format_validation_error(exc: ValidationError, where: str = "") -> str:
    """``stages[1].sparsify.sparsity: Input should be less than 1 (got 1.5)``: the first error, one line."""
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"] if x != "__root__")
        loc = f"{where}.{loc}" if where and loc else (where or loc)
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or got is None or e["type"] == "extra_forbidden" else f" (got {got!r})"
        if e["type"] == "extra_forbidden":
            msg = "unknown setting"
        parts.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def default_output(model: str, suffix: str) -> Path:
    base = Path(model.rstrip("/")).name or "model"
    return Path(f"{base}-{suffix}")


_json_printed = False  # a --json command printed its JSON (report or error object) on stdout


def emit(report: dict[str, Any], as_json: bool, render=None) -> None:
    """Print the report: JSON on stdout with ``--json``, else the command's rich rendering."""
    global _json_printed
    if as_json:
        _json_printed = True
        console.out.print_json(to_json(report)) if sys.stdout.isatty() else print(to_json(report))
    elif render is not None:
        render(report)


def wants_json(params: dict[str, Any]) -> bool:
    """The command's parsed parameters hold ``--json`` (``json``, or ``io`` 's ``as_json``)."""
    return any(v is True and (k == "json" or k.endswith("as_json")) for k, v in params.items())


def print_json_error(exc: BaseException | str, exit_code: int | None = None) -> None:
    """With --json, an error object on stdout unless the command already printed its JSON (CI's
    ``> report.json`` never gets an empty file)."""
    global _json_printed
    if _json_printed:
        return
    _json_printed = True
    print(to_json(error_object(exc, exit_code)))


def handle_errors(fn):
    """Turn known errors into one line on stderr and a meaningful exit code (traceback with DRAFTKIT_DEBUG=1);
    with --json, an error object on stdout too (:func:`draftkit.errors.error_object`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _json_printed
        debug = os.environ.get("DRAFTKIT_DEBUG") not in (None, "", "0")
        as_json = wants_json(kwargs)
        _json_printed = False
        try:
            with stops_as_interrupts():
                from draftkit.cachelimit import env_limit

                env_limit()  # a bad DRAFTKIT_CACHE_LIMIT fails before anything runs (exit 2)
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except DraftkitError as exc:
            if debug:
                traceback.print_exc()
            console.err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
            if as_json:
                print_json_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            code = getattr(exc, "exit_code", EXIT_INTERRUPTED)
            why = "terminated (SIGTERM)" if code == EXIT_TERMINATED else "interrupted"
            console.err.print(f"{why}: completed outputs are kept; re-run to resume")
            if as_json:
                print_json_error(exc, code)
            raise typer.Exit(code) from None
        except Exception as exc:  # noqa: BLE001
            if out_of_memory_line(exc) is not None:  # told once, in main(), with the setting of this command to lower
                exc.draftkit_command = fn.__module__.rsplit(".", 1)[-1]  # type: ignore[attr-defined]
                raise
            if debug:
                traceback.print_exc()
            user = user_error(exc)  # the user's machine (full disk, read-only, name too long...), not a bug
            if user is not None:
                console.err.print(f"[red]error:[/red] {escape(str(user))}", highlight=False)
                if as_json:
                    print_json_error(user)
                raise typer.Exit(user.exit_code) from None
            first = str(exc).splitlines()[0] if str(exc) else ""
            console.err.print(
                f"[red]internal error:[/red] {type(exc).__name__}: {escape(first)} (set DRAFTKIT_DEBUG=1 for the traceback)"
            )
            if as_json:
                print_json_error(exc, EXIT_INTERNAL)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def run_report_stage(name: str, model: str, cfg, *, output: Path | None, load, overwrite: bool,
                     as_json: bool, render) -> dict:
    """Run a measuring stage (eval, spec), print its report, and re-raise a failed gate after printing."""
    import json as jsonlib
    import tempfile

    from draftkit.errors import GateFailedError
    from draftkit.stages import run_stage

    with tempfile.TemporaryDirectory(prefix="draftkit-") as tmp:
        out = output or Path(tmp) / "report"
        try:
            report = run_stage(name, model, cfg, out=out, load=load, overwrite=overwrite)
        except GateFailedError:
            report = jsonlib.loads((out / "report.json").read_text())["report"]
            report["output"] = str(output) if output else None
            emit(report, as_json, render)
            raise
    if output is None:
        report["output"] = None
    emit(report, as_json, render)
    return report
