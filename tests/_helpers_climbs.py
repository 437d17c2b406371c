"""Follow a model name through draftkit's code while a command runs: the modules it stays in, and the climbs.

Definition (the reader's walk; tests/test_climbs.py). The command runs in-process under ``sys.setprofile``, which
sees every call of a function of draftkit's own package. A call *carries the model name* when one of its
arguments is the model name or the output folder (a string or path equal to it or inside it), or an object whose
attributes or items hold one (a model reference, a transformers config, model or tokenizer, a tuple of facts). The
*walk* is the sequence of the first call of each function that carries the name, in call order: reading the code
from the command down to the saved output, each function is read once. A module is a top-level module of
draftkit or one of its subpackages (``draftkit.checkpoint``, ``draftkit.engine``, ``draftkit.prune``, ...: a
subpackage is one layer). A *stay* is a maximal run of consecutive walk entries in one module; *modules* are the
distinct modules of the walk, ranked by their first stay. A *climb* is a stay in a module ranked above (first
entered before) the module of the stay before it: the reader goes back up to a module already left behind.

At 0843483 (the issue's "today") this gives, on the tiny Llama of tests/conftest.py, ``draftkit prune TINY --layers 1``:
42 stays over 19 modules with 16 climbs (``draftkit.checkpoint`` entered 7 times), and ``draftkit sparsify TINY
--sparsity 0.5``: 43 stays over 18 modules with 18 climbs; the issue counted 39 stays over 16 modules with 17
climbs by hand.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _module_of(filename: str, root: str) -> str:
    parts = os.path.relpath(filename, root)[:-3].split(os.sep)  # draftkit/checkpoint/files -> draftkit.checkpoint
    return ".".join(parts[:2]).removesuffix(".__init__")


def _carries(value: Any, marks: tuple[str, ...], depth: int = 0) -> bool:
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        return any(text == m or text.startswith(m + os.sep) for m in marks)
    if depth == 0 and isinstance(value, tuple):  # a named tuple of facts
        return any(_carries(v, marks, 1) for v in value[:50])
    if depth == 0 and hasattr(value, "__dict__") and not isinstance(value, type):
        try:
            attrs = list(vars(value).values())
        except TypeError:
            return False
        return any(_carries(v, marks, 1) for v in attrs[:50])
    return False


def walk(command: Callable[[], Any], *, package: str | Path, marks: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(module, function)`` of the walk while ``command()`` runs."""
    root = str(Path(package).resolve().parent)
    pkg = str(Path(package).resolve()) + os.sep
    seen: set[Any] = set()
    out: list[tuple[str, str]] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if not code.co_filename.startswith(pkg) or code in seen:
            return
        args = [frame.f_locals.get(n) for n in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]]
        if any(_carries(a, marks) for a in args if a is not None):
            seen.add(code)
            out.append((_module_of(code.co_filename, root), code.co_name))

    sys.setprofile(profile)
    try:
        command()
    finally:
        sys.setprofile(None)
    return out


def measure(entries: list[tuple[str, str]]) -> dict[str, Any]:
    """Stays, modules, climbs (see the module docstring), how often each module was entered, and the stays."""
    stays = [m for i, (m, _) in enumerate(entries) if i == 0 or entries[i - 1][0] != m]
    rank: dict[str, int] = {}
    for module in stays:
        rank.setdefault(module, len(rank))
    climbs = sum(1 for prev, now in zip(stays, stays[1:], strict=False) if rank[now] < rank[prev])
    entered = {m: stays.count(m) for m in rank}
    return {"stays": len(stays), "modules": len(rank), "climbs": climbs, "entered": entered, "path": stays}
