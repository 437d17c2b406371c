"""The README's spec-speedup table is the committed benchmark JSON, line for line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_spec_speedup_table_matches_the_json():
    spec = importlib.util.spec_from_file_location("spec_speedup", ROOT / "benchmarks" / "spec_speedup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = json.loads((ROOT / "benchmarks" / "results" / "spec_speedup.json").read_text())
    assert data["rows"]
    readme = (ROOT / "README.md").read_text()
    for line in module.markdown_table(data["rows"]):
        assert line in readme, line
    for row in data["rows"]:
        assert row["prompts"] >= 50 and row["hf"]["engine"] == "hf"
