"""#13: --overwrite can never destroy the user's work, diverged weights are never saved, one run per folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from draftkit.atomic import check_output_dir
from draftkit.cli import app
from draftkit.errors import EXIT_INVALID_INPUT, InvalidInputError
from tests._helpers_distill import sft_file, write_jsonl

FIXTURES = (sft_file,)
ROOT = Path(__file__).resolve().parent.parent


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *needles, code=EXIT_INVALID_INPUT):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


# ---- --overwrite -------------------------------------------------------------------------------


def test_export_into_the_working_folder_keeps_everything(tiny_llama, tmp_path, monkeypatch):
    """`cd proj && draftkit export model -o "$PWD" --overwrite` used to delete model/ and the user's files."""
    proj = tmp_path / "proj"
    shutil.copytree(tiny_llama, proj / "model")
    (proj / "thesis.txt").write_text("four years")
    before = tree(proj)
    monkeypatch.chdir(proj)
    one_line_error(invoke("export", "model", "-o", str(proj), "--overwrite"), "current folder")
    one_line_error(invoke("export", "model", "-o", ".", "--overwrite"), "current folder")
    one_line_error(invoke("export", "model", "-o", ".."), "above the current")
    assert tree(proj) == before


def test_output_that_contains_the_input_is_refused(tiny_llama, tmp_path):
    """`draftkit export container/model -o container --overwrite` used to delete container/model."""
    container = tmp_path / "container"
    shutil.copytree(tiny_llama, container / "model")
    (container / "draftkit.json").write_text("{}")  # even a draftkit output is not replaced when it holds the input
    before = tree(container)
    one_line_error(invoke("export", container / "model", "-o", container, "--overwrite"), "contains the input")
    assert tree(container) == before


def test_overwrite_replaces_only_draftkit_outputs(tiny_llama, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("four years")
    one_line_error(invoke("export", tiny_llama, "-o", thesis, "--overwrite"), "not a draftkit output")
    assert (thesis / "thesis.txt").read_text() == "four years"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke("export", tiny_llama, "-o", empty, "--overwrite").exit_code == 0
    assert (empty / "draftkit.json").is_file()
    # a data argument inside the output is protected like the input model
    calib = empty / "calib.jsonl"
    write_jsonl(calib, [{"text": "one two three four five six seven"}] * 8)
    one_line_error(invoke("prune", tiny_llama, "--layers", "1", "--calib", calib, "--samples", "2", "--seqlen", "8",
                          "-o", empty, "--overwrite"), "contains the input", "calib.jsonl")
    assert calib.is_file()


def test_never_home_or_root(tiny_llama, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(tiny_llama, home / "model")
    (home / "draftkit.json").write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # a literal "~" folder would land here, never in the repository
    before = tree(home)
    one_line_error(invoke("export", tiny_llama, "-o", "~", "--overwrite"), "home folder", "never replaces")
    assert tree(home) == before and not (tmp_path / "~").exists()
    with pytest.raises(InvalidInputError, match="filesystem root"):  # checked, never attempted
        check_output_dir("/", overwrite=True)


def test_dot_is_one_line_without_overwrite(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(invoke("prune", tiny_llama, "--drop", "1", "-o", "."), "current folder")
    assert "internal error" not in line
    assert list(tmp_path.iterdir()) == []


def test_old_output_kept_until_the_new_one_is_complete(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert invoke("prune", tiny_llama, "--drop", "1", "-o", out).exit_code == 0
    before = tree(out)
    import transformers

    def broken(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken)
    from draftkit.checkpoint.stream import ShardWriter  # prune --drop copies tensors shard by shard

    monkeypatch.setattr(ShardWriter, "write", broken)
    monkeypatch.setattr(ShardWriter, "copy", broken)
    r = invoke("prune", tiny_llama, "--drop", "2", "-o", out, "--overwrite")
    assert r.exit_code != 0
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temporary folder left


def test_outputs_respect_the_umask(tiny_llama, tmp_path):
    old = os.umask(0o022)
    try:
        assert invoke("prune", tiny_llama, "--drop", "1", "-o", tmp_path / "o").exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "o" / "draftkit.json").stat().st_mode) == 0o644


def test_check_output_dir_allows_new_and_empty(tmp_path):
    assert check_output_dir(tmp_path / "new", overwrite=False) == tmp_path / "new"
    (tmp_path / "e").mkdir()
    assert check_output_dir(tmp_path / "e", overwrite=True) == tmp_path / "e"


def test_regenerate_checks_everything_before_deleting(tiny_llama, sft_file, tmp_path):
    """`distill regenerate -o D --overwrite` used to rmtree D before reading its dataset, which lived in D."""
    d = tmp_path / "D"
    fast = ["--teacher", tiny_llama, "--max-new-tokens", "2", "--batch-size", "8", "--limit", "4"]
    assert invoke("distill", "regenerate", *fast, "--dataset", sft_file, "-o", d).exit_code == 0
    shutil.copy(sft_file, d / "data.jsonl")
    before = tree(d)
    one_line_error(invoke("distill", "regenerate", *fast, "--dataset", d / "data.jsonl", "-o", d, "--overwrite"),
                   "contains the input")
    assert tree(d) == before
    # unusable data elsewhere: the old rows stay
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}, {"x": 2}])
    r = invoke("distill", "regenerate", *fast, "--dataset", bad, "-o", d, "--overwrite")
    assert r.exit_code == EXIT_INVALID_INPUT, r.output
    assert tree(d) == before
    # a good overwrite replaces the rows, and the folder of rows stays draftkit's
    (d / "data.jsonl").unlink()
    r = invoke("distill", "regenerate", *fast, "--dataset", sft_file, "-o", d, "--overwrite", "--limit", "3", "--json")
    assert r.exit_code == 0, r.output
    assert len((d / "rows.jsonl").read_text().splitlines()) == 3
    assert json.loads(r.stdout)["rows_file"] == str(d / "rows.jsonl")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".D")]


# ---- non-finite weights ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_llama(tiny_llama, tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("nan") / "llama"
    shutil.copytree(tiny_llama, out)
    state = load_file(out / "model.safetensors")
    name = "model.layers.5.mlp.down_proj.weight"
    state[name][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("args", [
    ["prune", "--drop", "0"],
    ["sparsify", "--sparsity", "0.5", "--method", "magnitude"],
    ["export", "--format", "dense"],
])
def test_non_finite_weights_are_never_saved(nan_llama, tmp_path, args):
    cmd, *rest = args
    line = one_line_error(invoke(cmd, nan_llama, *rest, "-o", tmp_path / "o"), "NaN/Inf", "nothing was saved")
    assert "layers." in line and "mlp.down_proj.weight" in line
    assert list(tmp_path.iterdir()) == []


# ---- one run per folder ------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from draftkit.lock import folder_lock
    with folder_lock(sys.argv[1], "run"):
        print("locked", flush=True)
        time.sleep(120)
""")


GATED_RUN = textwrap.dedent("""
    import pathlib, sys, time
    import draftkit.prune, draftkit.engine.placement
    gate = pathlib.Path(sys.argv[2])
    def gated(real):
        def run_it(*a, **k):
            print("stage started", flush=True)
            while not gate.exists():
                time.sleep(0.05)
            return real(*a, **k)
        return run_it
    # prune --drop streams by the command's rule; a resident prune runs prune_model: gate either path
    draftkit.prune.prune_model = gated(draftkit.prune.prune_model)
    draftkit.engine.placement.write_streamed = gated(draftkit.engine.placement.write_streamed)
    sys.argv = ["draftkit", "run", sys.argv[1], "--set", sys.argv[3]]
    from draftkit.cli import main
    main()
""")


def _recipe(tmp_path, model, out) -> Path:
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"name": "t", "model": str(model), "output": str(out),
                                   "stages": [{"prune": {"drop": "0"}}]}))
    return rec


def _draftkit(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DRAFTKIT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "draftkit", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, **kw)


def test_two_concurrent_runs_one_folder(tiny_llama, tmp_path):
    """A second process gets one line naming the holder's PID; a lock left by a SIGKILLed holder is taken over."""
    out = tmp_path / "run"
    rec = _recipe(tmp_path, tiny_llama, out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = _draftkit("run", rec)
        assert r.returncode == EXIT_INVALID_INPUT, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"PID {holder.pid}" in lines[0] and "in use" in lines[0], r.stderr
        assert not (out / "00-prune").exists()
        # two real `draftkit run`s: the first is held inside its stage until the second has been refused
        gate = tmp_path / "gate"
        first = subprocess.Popen([sys.executable, "-c", GATED_RUN, str(rec), str(gate), f"output={out}2"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**env, "DRAFTKIT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"})
        assert first.stdout.readline().strip() == "stage started"
        second = _draftkit("run", rec, "--set", f"output={out}2")
        gate.touch()
        assert first.wait(timeout=300) == 0, first.stderr.read()
        assert second.returncode == EXIT_INVALID_INPUT and f"PID {first.pid}" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing anything: its lock is stale and the next run takes it over
    r = _draftkit("run", rec)
    assert r.returncode == 0, r.stderr
    assert (out / "00-prune" / "model.safetensors").is_file()
