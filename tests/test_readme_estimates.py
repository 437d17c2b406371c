"""The README's memory-estimate and demo-speed tables are the ones the benchmarks print from their committed JSON
(``benchmarks/estimates.py --table``, ``benchmarks/demo_speed.py --table``), row for row."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"dk_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    return module


def _section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(title):]
    return section[: section.index("\n### ", 5) if "\n### " in section[5:] else len(section)]


def test_readme_estimate_tables_are_the_json():
    estimates = _module("estimates")
    results = json.loads(estimates.RESULTS.read_text())
    section = _section("### Memory estimates against measured peaks")
    rows = [line for line in estimates.table(results).splitlines() if line.startswith("| ")]
    assert len(rows) > 10
    missing = [r for r in rows if r not in section.splitlines()]
    assert not missing, missing



def test_readme_demo_speed_table_is_the_json():
    demo = _module("demo_speed")
    results = json.loads(demo.RESULTS.read_text())
    section = _section("### Memory estimates against measured peaks")
    rows = [line for line in demo.table(results).splitlines() if line.startswith("| ")]
    assert len(rows) >= 2 and all(r in section.splitlines() for r in rows)


def test_readme_estimate_summary_is_the_json():
    """The sentences on the targets (how many rows within 25%, growth per layer, recipe against commands) are the
    ones ``benchmarks/estimates.py --table`` prints from the JSON."""
    estimates = _module("estimates")
    results = json.loads(estimates.RESULTS.read_text())
    section = _section("### Memory estimates against measured peaks")
    lines = estimates.summary(results).splitlines()
    assert len(lines) >= 4
    missing = [line for line in lines if line not in section.splitlines()]
    assert not missing, missing
