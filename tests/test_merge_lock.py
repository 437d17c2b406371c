"""`draftkit merge` holds its output's lock like every command that writes one: a second merge into the same -o
while the first writes gets one line naming the first's PID instead of both succeeding; a mistyped input is
named before the output is looked at."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.errors import EXIT_INVALID_INPUT
from tests.test_hostile_io import HOLD_OUTPUT, one_line


def merge(*args):
    return CliRunner().invoke(app, ["merge", *[str(a) for a in args]])


def test_two_merges_into_one_output(tiny_llama, tmp_path):
    out = tmp_path / "same"
    assert merge(tiny_llama, tiny_llama, "-o", out).exit_code == 0
    first = json.loads((out / "draftkit.json").read_text())
    root = Path(__file__).resolve().parent.parent
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OUTPUT, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_line(merge(tiny_llama, tiny_llama, "--t", "0.25", "-o", out, "--overwrite"))
        assert f"PID {holder.pid}" in line and "in use" in line
        assert json.loads((out / "draftkit.json").read_text()) == first  # the first writer's output untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert merge(tiny_llama, tiny_llama, "--t", "0.25", "-o", out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"]  # no lock file left behind


def test_a_missing_input_is_named_before_an_existing_output(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = merge(tiny_llama, tmp_path / "missing", "-o", out)
    assert result.exit_code == EXIT_INVALID_INPUT
    assert "missing" in result.output and "already exists" not in result.output
