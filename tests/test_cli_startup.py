"""`draftkit --help` and `--version` stay light: command modules load only when their command runs.
(The time itself is a benchmark figure: benchmarks/cli_startup.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from draftkit.cli import _LAZY, app, load_command

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "datasets", "numpy")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], [], ["models"], ["models", "--json"]])
def test_help_and_version_import_no_heavy_module(argv):
    code = (
        "import sys\n"
        f"sys.argv = ['draftkit', *{argv!r}]\n"
        "from draftkit.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "LOADED []" in out, out


def test_listed_help_is_each_commands_own_first_sentence():
    for name, (_, _, _, short) in _LAZY.items():
        cmd = load_command(name)
        full = " ".join((cmd.help or "").split())
        assert full.startswith(short), (name, short, full[:120])


def test_every_command_is_listed_and_runs_its_help():
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for name in _LAZY:
        assert f"  {name} " in top.output
        assert runner.invoke(app, [name, "--help"]).exit_code == 0, name
    assert set(typer.main.get_command(app).commands) == set(_LAZY)


def test_a_mistyped_command_suggests_the_right_one():
    res = CliRunner().invoke(app, ["prun"])
    assert res.exit_code == 2
    assert "prune" in res.output
