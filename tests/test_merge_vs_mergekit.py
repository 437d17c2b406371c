"""draftkit merge against the peer: mergekit's ``mergekit-yaml`` with ``merge_method: slerp`` and ``linear`` on the
same tiny models gives the same tensors within 1e-6. Runs when mergekit is installed in its own venv
(``/work/venv-mergekit`` or ``DRAFTKIT_MERGEKIT_PYTHON`` naming that venv's python); skipped otherwise."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from draftkit.cli import app
from tests.conftest import make_tiny_model


def mergekit_yaml() -> Path | None:
    python = os.environ.get("DRAFTKIT_MERGEKIT_PYTHON")
    candidates = [Path(python).parent / "mergekit-yaml"] if python else []
    candidates.append(Path("/work/venv-mergekit/bin/mergekit-yaml"))
    return next((c for c in candidates if c.is_file()), None)


MERGEKIT = mergekit_yaml()
pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit is not installed (set DRAFTKIT_MERGEKIT_PYTHON)")


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def pair(tiny_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("peer")
    return [make_tiny_model("llama", tiny_tokenizer_dir, root / f"m{i}", layers=3, seed=10 + i) for i in range(2)]


def _mergekit(config: dict, out: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    cfg = tmp_path / f"{out.name}.yml"
    cfg.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(MERGEKIT), str(cfg), str(out), "--quiet"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return _weights(out)


def _draftkit(args: list[str], out: Path) -> dict[str, torch.Tensor]:
    r = CliRunner().invoke(app, ["merge", *args, "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    return _weights(out)


def _same(mine: dict, theirs: dict) -> float:
    shared = set(mine) & set(theirs)
    assert shared and set(mine) - {"lm_head.weight"} <= set(theirs) | {"lm_head.weight"}
    worst = 0.0
    for k in shared:
        assert mine[k].dtype == theirs[k].dtype, k
        worst = max(worst, float((mine[k].double() - theirs[k].double()).abs().max()))
    return worst


@pytest.mark.parametrize("t", [0.5, 0.3])
def test_slerp_equals_mergekit(pair, tmp_path, t):
    a, b = pair
    theirs = _mergekit({"merge_method": "slerp", "base_model": str(a), "dtype": "float32",
                        "models": [{"model": str(a)}, {"model": str(b)}], "parameters": {"t": t}},
                       tmp_path / "mk", tmp_path)
    mine = _draftkit([str(a), str(b), "--method", "slerp", "--t", str(t)], tmp_path / "dk")
    assert _same(mine, theirs) <= 1e-6


def test_slerp_per_tensor_kind_equals_mergekit(pair, tmp_path):
    a, b = pair
    theirs = _mergekit({"merge_method": "slerp", "base_model": str(a), "dtype": "float32",
                        "models": [{"model": str(a)}, {"model": str(b)}],
                        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                                             {"filter": "mlp", "value": 0.7}, {"value": 0.4}]}},
                       tmp_path / "mk", tmp_path)
    mine = _draftkit([str(a), str(b), "--t-filters", "self_attn=0:0.5:1,mlp=0.7", "--t", "0.4"], tmp_path / "dk")
    assert _same(mine, theirs) <= 1e-6


def test_linear_equals_mergekit(pair, tmp_path):
    a, b = pair
    theirs = _mergekit({"merge_method": "linear", "dtype": "float32",
                        "models": [{"model": str(a), "parameters": {"weight": 0.7}},
                                   {"model": str(b), "parameters": {"weight": 0.3}}]},
                       tmp_path / "mk", tmp_path)
    mine = _draftkit([str(a), str(b), "--method", "linear", "--weights", "0.7,0.3"], tmp_path / "dk")
    assert _same(mine, theirs) <= 1e-6
    assert json.loads((tmp_path / "dk" / "draftkit.json").read_text())["facts"]["method"] == "linear"
