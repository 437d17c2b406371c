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

# name -> (module, attribute, "command" | "group", one-line help shown by `draftkit --help`).
# The one-line help is the first sentence of the command's docstring (tests/test_cli_startup.py checks it).
_LAZY: dict[str, tuple[str, str, str, str]] = {
    "prune": ("draftkit.cli.prune", "prune", "command", "Drop N decoder blocks, scored by angular distance between hidden states."),
    "sparsify": ("draftkit.cli.sparsify", "sparsify", "command",
                 "Prune individual weights of every decoder linear (embeddings and lm_head stay dense), one layer at a time, with SparseGPT (default), Wanda or magnitude."),
    "distill": ("draftkit.cli.distill", "app", "group",
                "Self-data distillation: the teacher rewrites the SFT set, then the student is fine-tuned on it with its sparsity masks held fixed."),
    "export": ("draftkit.cli.export", "export", "command",
               "Write a sparse (compressed-tensors sparse-bitmask) or dense safetensors checkpoint."),
    "decompress": ("draftkit.cli.export", "decompress", "command",
                   "Turn a sparse-bitmask checkpoint into dense safetensors (loads in vLLM, transformers, llama.cpp)."),
    "eval": ("draftkit.cli.evaluate", "evaluate", "command",
             "Evaluate a model; with --baseline, report quality recovery and gate on it (exit code 3)."),
    "spec": ("draftkit.cli.spec", "spec", "command",
             "Speculative decoding, greedy or sampled (--temperature): mean accepted length (MAL), the speedup measured "
             "in an engine (--engine), the latency cost model's prediction for every k, and a dynamic k (--k dynamic)."),
    "search": ("draftkit.cli.search", "search", "command",
               "Build and measure draft candidates for a target (blocks dropped x sparsity x healing, or other bases): MAL, measured cost, predicted and engine speedup, the frontier, and the best draft as a recipe."),
    "merge": ("draftkit.cli.merge", "merge", "command",
              "Merge models tensor by tensor (SLERP, linear, task arithmetic), keeping their sparsity masks."),
    "run": ("draftkit.cli.run", "run", "command", "Run a recipe's stages in order, resuming where a previous run stopped."),
    "recipes": ("draftkit.cli.run", "recipes_app", "group", "List, show and validate recipes."),
    "inspect": ("draftkit.cli.info", "inspect", "command",
                "Show a model's architecture, layers, parameters, dtype, per-layer sparsity and draftkit provenance."),
    "models": ("draftkit.cli.models", "models", "command", "List the short model names draftkit accepts and the hub ids they stand for."),
}


def load_command(name: str):
    """Import one command's module and build its click command (with the options every command has)."""
    module, attr, kind, _ = _LAZY[name]
    obj = getattr(importlib.import_module(module), attr)
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
            if name not in _LAZY:
                raise KeyError(name)
            self._loaded[name] = load_command(name)
        return self._loaded[name]

    def __setitem__(self, name: str, cmd) -> None:
        self._loaded[name] = cmd

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in _LAZY or name in self._loaded

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*_LAZY, *self._loaded]))

    def __len__(self) -> int:
        return len(dict.fromkeys([*_LAZY, *self._loaded]))


class _LazyGroup(TyperGroup):
    """The root group: commands are listed from :data:`_LAZY` and imported only when used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _LazyCommands(self.commands)

    def list_commands(self, ctx) -> list[str]:
        return list(self.commands)

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, _LAZY[n][3]) for n in _LAZY])


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

        line = out_of_memory_line(exc, getattr(exc, "draftkit_command", None))
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
