"""The README's memory-estimate and demo-speed tables are the ones the benchmarks print from their committed JSON
(``benchmarks/estimates.py --table``, ``benchmarks/demo_speed.py --table``), row for row."""

from __future__ import annotations

import json
from pathlib import Path

from tests._helpers_bench import load_benchmark, readme_section

ROOT = Path(__file__).resolve().parent.parent


def test_readme_estimate_tables_are_the_json():
    estimates = load_benchmark("estimates")
    results = json.loads(estimates.RESULTS.read_text())
    section = readme_section("### Memory estimates against measured peaks")
    rows = [line for line in estimates.table(results).splitlines() if line.startswith("| ")]
    assert len(rows) > 10
    missing = [r for r in rows if r not in section.splitlines()]
    assert not missing, missing



def test_readme_demo_speed_table_is_the_json():
    demo = load_benchmark("demo_speed")
    results = json.loads(demo.RESULTS.read_text())
    section = readme_section("### Memory estimates against measured peaks")
    rows = [line for line in demo.table(results).splitlines() if line.startswith("| ")]
    assert len(rows) >= 2 and all(r in section.splitlines() for r in rows)


def test_readme_estimate_summary_is_the_json():
    """The sentences on the targets (how many rows within 25%, growth per layer, recipe against commands) are the
    ones ``benchmarks/estimates.py --table`` prints from the JSON."""
    estimates = load_benchmark("estimates")
    results = json.loads(estimates.RESULTS.read_text())
    section = readme_section("### Memory estimates against measured peaks")
    lines = estimates.summary(results).splitlines()
    assert len(lines) >= 4
    missing = [line for line in lines if line not in section.splitlines()]
    assert not missing, missing
