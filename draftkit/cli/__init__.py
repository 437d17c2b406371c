"""The ``draftkit`` command line: thin commands that parse, call one library function and print.

Errors are one line on stderr with a meaningful exit code (see :mod:`draftkit.errors`);
set DRAFTKIT_DEBUG=1 for tracebacks.

Command modules are imported only when their command runs (or its ``--help`` is asked for), so
``draftkit --help`` and ``draftkit --version`` never import torch or transformers.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import typer
from typer.core import TyperGroup

# name -> (module, attribute, "command" | "group", one-line help shown by `draftkit --help`): the commands that are
# not a stage; each stage's command is registered with the stage (draftkit.registry) and listed before these.
# The one-line help is the first sentence of the command's docstring (tests/test_cli_startup.py checks it).
_OTHERS: dict[str, tuple[str, str, str, str]] = {
    "decompress": ("draftkit.cli.export", "decompress", "command",
                   "Turn a sparse-bitmask checkpoint into dense safetensors (loads in vLLM, transformers, llama.cpp)."),
    "run": ("draftkit.cli.run", "run", "command", "Run a recipe's stages in order, resuming where a previous run stopped."),
    "recipes": ("draftkit.cli.run", "recipes_app", "group", "List, show and validate recipes."),
    "inspect": ("draftkit.cli.info", "inspect", "command",
                "Show a model's architecture, layers, parameters, dtype, per-layer sparsity and draftkit provenance."),
    "models": ("draftkit.cli.models", "models", "command", "List the short model names draftkit accepts and the hub ids they stand for."),
}


def commands() -> dict[str, tuple[Any, str, str, str]]:
    """Every command: ``name -> (module or the command itself, attribute, kind, one-line help)``, the stages'
    from :mod:`draftkit.registry` (read without importing any stage) and then the others."""
    from draftkit.registry import stages

    table: dict[str, tuple[Any, str, str, str]] = {}
    for name, entry in stages().items():
        ref = entry._fields["command"]
        if ref is not None:
            module, _, attr = ref.partition(":") if isinstance(ref, str) else (ref, "", "")
            table[name] = (module, attr, entry.command_kind, entry.help)
    return {**table, **_OTHERS}


_LAZY = commands()


def load_command(name: str):
    """Import one command's module and build its click command (with the options every command has)."""
    module, attr, kind, _ = commands()[name]
    obj = getattr(importlib.import_module(module), attr) if isinstance(module, str) else module
    if kind == "group":
        cmd = typer.main.get_command(obj)
    else:
        single = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
        single.command(name)(obj)
        cmd = typer.main.get_command(single)
    cmd.name = name
    _add_common_options(cmd)
    return cmd


def _set_threads(ctx, param, value):
    from draftkit.threads import set_default

    set_default(value)


def _set_verbose(ctx, param, value):
    from draftkit import console

    console.set_verbose(bool(value))


def _common_params() -> list:
    """The click parameters of ``--threads`` and ``--verbose``, built by typer from a stand-in command."""
    holder = typer.Typer(add_completion=False)

    @holder.command()
    def _stand_in(
        threads: int | None = typer.Option(
            None, "--threads", min=1, expose_value=False, callback=_set_threads,
            help="CPU threads for torch (default: the free cores, i.e. cores minus those other processes keep busy, at least 1; "
                 "or DRAFTKIT_THREADS)"),
        verbose: bool = typer.Option(False, "--verbose", expose_value=False, callback=_set_verbose,
                                     help="show third-party progress bars and library warnings"),
    ) -> None:
        pass

    return list(typer.main.get_command(holder).params)


def _add_common_options(cmd) -> None:
    """``--threads`` and ``--verbose`` on every command and subcommand (processed before the command runs)."""
    subcommands = getattr(cmd, "commands", None)
    if subcommands:
        for sub in subcommands.values():
            _add_common_options(sub)
        return
    taken = {o for p in cmd.params for o in getattr(p, "opts", [])}
    cmd.params.extend(p for p in _common_params() if not set(p.opts) & taken)


class _LazyCommands(MutableMapping):
    """``group.commands`` that imports a command's module the first time the command is looked up."""

    def __init__(self, loaded: Mapping[str, Any]):
        self._loaded: dict[str, Any] = dict(loaded)

    def __getitem__(self, name: str):
        if name not in self._loaded:
            if name not in commands():
                raise KeyError(name)
            self._loaded[name] = load_command(name)
        return self._loaded[name]

    def __setitem__(self, name: str, cmd) -> None:
        self._loaded[name] = cmd

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in commands() or name in self._loaded

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*commands(), *self._loaded]))

    def __len__(self) -> int:
        return len(dict.fromkeys([*commands(), *self._loaded]))


class _LazyGroup(TyperGroup):
    """The root group: commands are listed from :data:`_LAZY` and imported only when used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _LazyCommands(self.commands)

    def list_commands(self, ctx) -> list[str]:
        return list(self.commands)

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, c[3]) for n, c in commands().items()])


app = typer.Typer(
    name="draftkit",
    cls=_LazyGroup,
    help="Turn language models into fast, well-aligned draft models for speculative decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="print the version and exit", is_eager=True),
) -> None:
    if version:
        from draftkit._version import __version__

        print(f"draftkit {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit(0)


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from draftkit.signals import stops_as_interrupts

    try:
        with stops_as_interrupts():  # SIGTERM as Ctrl-C from the start (a command's handle_errors says more)
            app()
    except SystemExit as exc:  # a usage error click reported (exit 2) before any command ran: --json still gets JSON
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code and "--json" in sys.argv[1:]:
            from draftkit.cli._common import print_json_error

            print_json_error("invalid command line (the message is on stderr)", code)
        raise
    except KeyboardInterrupt as exc:
        code = getattr(exc, "exit_code", 130)
        sys.stderr.write("terminated (SIGTERM)\n" if code == 143 else "interrupted\n")
        sys.exit(code)
    except Exception as exc:  # a CUDA out-of-memory error from any command: one line naming what to lower
        from draftkit.errors import EXIT_INVALID_INPUT, out_of_memory_line
        from draftkit.registry import by_command

        command = getattr(exc, "draftkit_command", None)
        entry = by_command(command or "")  # a stage's command: the settings the stage registers
        line = out_of_memory_line(exc, command, entry.oom if entry is not None else None)
        if line is None:
            raise
        if os.environ.get("DRAFTKIT_DEBUG") not in (None, "", "0"):
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"error: {line}\n")
        if "--json" in sys.argv[1:]:
            from draftkit.cli._common import print_json_error

            print_json_error(line, EXIT_INVALID_INPUT)
        sys.exit(EXIT_INVALID_INPUT)
