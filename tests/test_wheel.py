"""draftkit works where users work: from an installed wheel and from any directory.

Builds the wheel from a copy of the source tree, installs it into a fresh virtual environment that
reuses this environment's packages through a .pth file (no download; torch stays the local one),
and runs the shipped demo recipe (trimmed as in test_demo_recipe.py) from an empty temporary
directory with the installed ``draftkit`` command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "draftkit", "recipes", "examples/tiny/teacher",
           "examples/tiny/data"]
TRIM = [
    "stages.0.prune.calib.samples=8",
    "stages.1.sparsify.calib.samples=8",
    "stages.2.distill.limit=32",
    "stages.2.distill.max_new_tokens=32",
    "stages.4.eval.limit=8",
    "stages.4.eval.min_recovery=0.01", "stages.5.spec.min_mal=1.0",
    "stages.5.spec.limit=2",
    "stages.5.spec.max_new_tokens=16",
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "DRAFTKIT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for rel in SOURCES:
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / rel, src / rel)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, env=_env())
    (whl,) = dist.glob("draftkit-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; this environment's packages visible through a .pth."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "_shared_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, env=_env())
    return venv


def test_wheel_carries_recipes_and_demo(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "draftkit/_shipped/recipes/demo.yaml" in names
    assert "draftkit/_shipped/examples/tiny/teacher/model.safetensors" in names
    assert {"draftkit/_shipped/examples/tiny/data/train.jsonl", "draftkit/_shipped/examples/tiny/data/test.jsonl"} <= names


def test_demo_runs_from_installed_wheel_in_any_directory(installed, tmp_path):
    where = tmp_path / "elsewhere"
    where.mkdir()
    draftkit = str(installed / "bin" / "draftkit")
    env = _env()
    # the installed package is the one that runs, not this checkout
    origin = subprocess.run([str(installed / "bin" / "python"), "-c", "import draftkit; print(draftkit.__file__)"],
                            cwd=where, env=env, check=True, capture_output=True, text=True).stdout
    assert origin.startswith(str(installed)), origin
    listed = json.loads(subprocess.run([draftkit, "models", "--json"], cwd=where, env=env, check=True,
                                       capture_output=True, text=True).stdout)
    assert Path(listed["demo-teacher"]).is_dir()
    args = [draftkit, "run", "demo", "--json"] + [x for kv in TRIM for x in ("--set", kv)]
    proc = subprocess.run(args, cwd=where, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert [s["status"] for s in report["stages"]] == ["done"] * 6
    out = where / "runs" / "demo"
    assert (out / "report.md").is_file() and (out / "02-distill" / "model.safetensors").is_file()
    assert 1.0 <= report["stages"][5]["report"]["mal"] <= 5.0


def test_failed_run_writes_nothing(installed, tmp_path):
    """A recipe whose model does not exist fails in one line with exit 2 and leaves no run folder."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\nmodel: ./no-such-model\noutput: runs/bad\nstages:\n  - prune: {layers: 1}\n")
    proc = subprocess.run([str(installed / "bin" / "draftkit"), "run", str(recipe)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no-such-model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
