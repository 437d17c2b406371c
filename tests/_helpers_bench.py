"""Tests that read the benchmarks: load a script of benchmarks/ as a module, and cut one section of the README."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` as a module (the repository root on ``sys.path`` while it imports)."""
    spec = importlib.util.spec_from_file_location(f"dk_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    return module


def readme_section(title: str, readme: str | None = None) -> str:
    """The README from ``title`` to the next ``###`` heading."""
    readme = (ROOT / "README.md").read_text() if readme is None else readme
    section = readme[readme.index(title):]
    return section[: section.index("\n### ", 5) if "\n### " in section[5:] else len(section)]
