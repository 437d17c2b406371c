"""#22, the recipe/data/signals half: hostile recipes and datasets, hard stops, user errors from the machine.

Each test fails on the code before #22: duplicate keys and alias bombs in recipes, a flood of unknown keys,
chat content that is not text, rows far longer than training can use, SIGTERM, OSErrors of the user's machine
(full disk, read-only file system, names too long), library warnings without --verbose, and lock races.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import draftkit.prune
from draftkit.cli import app
from draftkit.errors import EXIT_INVALID_INPUT, EXIT_TERMINATED
from draftkit.recipe import RecipeError, parse_recipe
from tests.test_pipeline import write_recipe

HEAD = "name: t\nmodel: m\noutput: o\n"
STAGES = "stages:\n  - prune: {layers: 2}\n"


@pytest.fixture(autouse=True)
def _console_as_it_was(monkeypatch):
    """`--quiet` sets a module-wide flag: put it back after each test (later tests read the console)."""
    import draftkit.console

    monkeypatch.setattr(draftkit.console, "_quiet", draftkit.console._quiet)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result, code=EXIT_INVALID_INPUT, prefix="error:"):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), result.output
    return lines[0]


# ---- recipes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, needle", [
    (HEAD + "output: elsewhere\n" + STAGES, "r.yaml:4:1: duplicate key 'output' (first at line 3)"),
    (HEAD + STAGES + "stages:\n  - prune: {drop: '0'}\n", "r.yaml:6:1: duplicate key 'stages' (first at line 4)"),
    (HEAD + "stages:\n  - prune: {layers: 2, layers: 3}\n", "r.yaml:5:24: duplicate key 'layers' (first at line 5)"),
])
def test_duplicate_keys_are_refused_with_their_line(text, needle):
    with pytest.raises(RecipeError) as exc:
        parse_recipe(text, filename="r.yaml")
    assert needle in str(exc.value)


def _bomb(levels: int = 9, fan: int = 9) -> str:
    """The "billion laughs": each level a list of nine aliases of the level below (9**9 values once expanded)."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]")
    return "\n".join(lines) + "\n" + HEAD + f"description: *a{levels}\n" + STAGES


def test_alias_bomb_is_refused_at_once_in_one_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())
    assert len(bomb.read_bytes()) < 1000
    t0 = time.perf_counter()
    line = one_line(invoke("recipes", "validate", bomb))
    assert time.perf_counter() - t0 < 1.0
    assert "alias" in line and "100,000 values" in line
    # aliases that stay small still work as YAML has them
    ok = parse_recipe(HEAD + "stages:\n  - prune: &d {layers: 2}\n  - prune: *d\n")
    assert [s.config.layers for s in ok.steps] == [2, 2]


def test_recursive_alias_and_deep_nesting_are_one_line():
    with pytest.raises(RecipeError, match="refers to the value that contains it"):
        parse_recipe(HEAD + STAGES + "description: &x [*x]\n", filename="r.yaml")
    with pytest.raises(RecipeError, match="nested more than 64 levels"):
        parse_recipe(HEAD + STAGES + "description: " + "[" * 200 + "]" * 200 + "\n", filename="r.yaml")


def test_interpolation_bomb_is_refused_quickly():
    """Strings that name the one before nine times, ten levels deep: 10 * 9**9 characters if expanded."""
    refs = ["v0: xxxxxxxxxx"] + [f"v{i}: \"{('${v' + str(i - 1) + '}') * 9}\"" for i in range(1, 10)]
    text = "\n".join(refs) + "\n" + HEAD + "description: ${v9}\n" + STAGES
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="more than 100,000 characters"):
        parse_recipe(text, filename="r.yaml")
    assert time.perf_counter() - t0 < 1.0


def test_flood_of_unknown_keys_lists_the_first_and_counts_the_rest(tmp_path):
    rec = tmp_path / "flood.yaml"
    rec.write_text(HEAD + STAGES + "".join(f"unknown_{i}: {i}\n" for i in range(5000)))
    r = invoke("recipes", "validate", rec)
    assert r.exit_code == EXIT_INVALID_INPUT
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 21, r.output[:2000]
    assert "flood.yaml:6:1: unknown key 'unknown_0'" in lines[0]
    assert lines[-1] == "... and 4,980 more problems"


def test_a_recipe_of_megabytes_is_refused_before_parsing(tmp_path):
    rec = tmp_path / "big.yaml"
    rec.write_text(HEAD + STAGES + "".join(f"unknown_key_{i}: {i}\n" for i in range(400_000)))
    t0 = time.perf_counter()
    line = one_line(invoke("recipes", "validate", rec))
    assert time.perf_counter() - t0 < 1.0
    assert "too large" in line and "big.yaml" in line


# ---- hard stops ----------------------------------------------------------------------------------


def _signal_in_stage(monkeypatch, signum: int, at_call: int) -> None:
    """Send ``signum`` to this process when a prune stage runs for the ``at_call``-th time (resident or streamed)."""
    import draftkit.engine.placement

    calls = {"n": 0}

    def wrap(real):
        def run_it(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at_call:
                os.kill(os.getpid(), signum)
            return real(*args, **kwargs)
        return run_it

    monkeypatch.setattr(draftkit.prune, "prune_model", wrap(draftkit.prune.prune_model))
    monkeypatch.setattr(draftkit.engine.placement, "write_streamed", wrap(draftkit.engine.placement.write_streamed))


def test_sigterm_is_handled_like_ctrl_c(tiny_llama, calib_file, tmp_path, monkeypatch):
    rec = write_recipe(tmp_path, tiny_llama, calib_file)
    out = tmp_path / "run"
    _signal_in_stage(monkeypatch, signal.SIGTERM, at_call=2)  # in the middle of stage 1, as `timeout -s TERM` would
    before = signal.getsignal(signal.SIGTERM)
    line = one_line(invoke("run", rec, "--quiet"), code=EXIT_TERMINATED, prefix="terminated (SIGTERM)")
    assert "re-run to resume" in line
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is gone with it
    manifest = json.loads((out / "manifest.json").read_text())
    assert [manifest["stages"][i]["status"] for i in ("0", "1")] == ["done", "interrupted"]
    assert manifest["stages"]["1"]["error"] == "Interrupted: SIGTERM"
    assert not (out / ".draftkit.lock").exists()
    assert not (out / "01-prune").exists() and not list(out.glob(".*.tmp-*"))

    monkeypatch.undo()
    r = invoke("run", rec, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [s["skipped"] for s in report["stages"]] == [True, False]
    assert not (out / ".draftkit.lock").exists()


def test_ctrl_c_takes_the_same_path(tiny_llama, calib_file, tmp_path, monkeypatch):
    rec = write_recipe(tmp_path, tiny_llama, calib_file)
    _signal_in_stage(monkeypatch, signal.SIGINT, at_call=1)
    one_line(invoke("run", rec, "--quiet"), code=130, prefix="interrupted:")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["0"]["status"] == "interrupted"
    assert not (tmp_path / "run" / ".draftkit.lock").exists()


def test_recipe_yaml_round_trip_has_no_aliases(tmp_path):
    rec = parse_recipe(HEAD + "description: ${output}\nstages:\n  - prune: &d {layers: 2}\n  - prune: *d\n")
    assert "&" not in rec.to_yaml() and "*" not in rec.to_yaml()
    assert yaml.safe_load(rec.to_yaml())["stages"][1] == {"prune": {"layers": 2}}


# ---- noise ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verbose", [False, True])
def test_past_key_values_warning_only_with_verbose(tiny_llama, tmp_path, verbose):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "one two three"}) + "\n")
    args = ["spec", tiny_llama, "--target", tiny_llama, "--prompts", prompts, "--k", "2", "--max-new-tokens", "4",
            "--json", *(["--verbose"] if verbose else [])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = invoke(*args)
        assert r.exit_code == 0, r.output
    said = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert bool(said) == verbose, said


# ---- datasets ------------------------------------------------------------------------------------------


def _chat(path, bad_row, good=4):
    """A JSON Lines file of chat rows whose third line (after a blank second line) is ``bad_row``."""
    rows = [{"messages": [{"role": "user", "content": f"what is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"}]}
            for i in range(good)]
    path.write_text("\n".join([json.dumps(rows[0]), "", json.dumps(bad_row), *map(json.dumps, rows[1:])]) + "\n")
    return path


@pytest.mark.parametrize("bad, needle", [
    ({"messages": [{"role": "user", "content": {"text": "hi"}}, {"role": "assistant", "content": "hello"}]},
     "turn 0's content is a dict"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]},
     "turn 1's content is a list"),
    ({"messages": ["hi", "hello"]}, "turn 0 is a str"),
    ({"messages": "hi there"}, "the messages are a str, not a list of turns"),
])
def test_chat_rows_that_are_not_text_are_refused_with_file_and_line(tiny_llama, tmp_path, bad, needle):
    data = _chat(tmp_path / "chat.jsonl", bad)
    out = tmp_path / "out"
    line = one_line(invoke("distill", "train", tiny_llama, "--dataset", data, "-o", out, "--max-steps", "1"))
    assert f"{data}:3: " in line and needle in line
    assert not out.exists()
    # the same rows as calibration data: the same line
    line = one_line(invoke("prune", tiny_llama, "--layers", "1", "--calib", data, "-o", out))
    assert f"{data}:3: " in line and needle in line


def test_rows_longer_than_max_length_are_cut_as_text_first(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from draftkit.textcap import TextCap

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    long = " ".join(f"w{i % 97}" for i in range(400_000))  # 1.5 MB in one row
    cap = TextCap(tok, 64)
    cut = cap(long)
    assert len(cut) == cap.limit < len(long) and cap.cut == 1
    # what is kept is what the whole text would have given: the first 64 tokens are the same
    assert tok(cut, add_special_tokens=False)["input_ids"][:64] == tok(long, add_special_tokens=False)["input_ids"][:64]

    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}?", "answer": long if i == 1 else f"a{i}"}) + "\n"
                            for i in range(4)))
    r = invoke("distill", "train", tiny_llama, "--dataset", data, "-o", tmp_path / "out", "--max-steps", "1",
               "--max-length", "64")
    assert r.exit_code == 0, r.output
    said = [ln for ln in r.output.splitlines() if "cut to their first" in ln]
    assert len(said) == 1 and "1 text(s) longer than 64 tokens" in said[0] and f"{len(long):,} characters" in said[0], said



def test_a_spec_prompt_longer_than_the_context_is_cut_as_text(tiny_llama, tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello world " * 100_000}) + "\n")  # 1.2 MB; the context is 256
    r = invoke("spec", tiny_llama, "--target", tiny_llama, "--prompts", prompts, "--k", "2", "--max-new-tokens", "2",
               "--json")
    assert r.exit_code == 0, r.output
    said = [ln for ln in r.output.splitlines() if "cut to their first" in ln]
    assert len(said) == 1 and "longer than 256 tokens can hold" in said[0], r.output[-2000:]

# ---- the user's machine: OSErrors are user errors with their fix ----------------------------------------


def test_output_under_a_regular_file_or_too_long_is_one_line(tiny_llama, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for out in (afile / "out", afile / "a" / "b"):
        line = one_line(invoke("prune", tiny_llama, "--drop", "0", "-o", out))
        assert "a file, not a folder" in line
    line = one_line(invoke("prune", tiny_llama, "--drop", "0", "-o", tmp_path / ("x" * 300)))
    assert "file name too long" in line and "shorter output name" in line
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_file_size_limit_is_a_user_error(tiny_llama, tmp_path):
    """A real refusal of the OS (RLIMIT_FSIZE: EFBIG, what a FAT32 or quota'd disk says), raised inside
    safetensors' Rust writer: exit 2 and one line, not `internal error`."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))  # the tiny model is 1 MB
    try:
        r = invoke("prune", tiny_llama, "--drop", "0", "-o", tmp_path / "out")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    line = one_line(r)
    assert "file too large for this file system" in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("code, needle", [(errno.ENOSPC, "no space left on the device"),
                                          (errno.EROFS, "read-only file system"),
                                          (errno.EDQUOT, "disk quota exceeded")])
def test_full_disk_and_read_only_outputs_are_one_line(tiny_llama, tmp_path, monkeypatch, code, needle):
    import draftkit.atomic

    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "out"))

    monkeypatch.setattr(draftkit.atomic.tempfile, "mkdtemp", refused)  # where the output folder is made
    line = one_line(invoke("prune", tiny_llama, "--drop", "0", "-o", tmp_path / "out"))
    assert line.startswith(f"error: {tmp_path / 'out'}: {needle}: ")


def test_library_errors_that_carry_the_os_words_are_classified():
    from safetensors import SafetensorError

    from draftkit.oserrors import user_error

    rust = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    assert "no space left on the device" in str(user_error(rust))
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/ro/x")
        except OSError as inner:
            raise RuntimeError("could not save") from inner
    except RuntimeError as outer:
        assert str(user_error(outer)).startswith("/ro/x: read-only file system: ")
    assert user_error(ValueError("a bug")) is None and user_error(KeyError("x")) is None
    assert user_error(FileNotFoundError(errno.ENOENT, "No such file", "x")) is None  # could be a bug: stays internal


# ---- races ---------------------------------------------------------------------------------------------

HOLD_OUTPUT = """
import sys, time
from draftkit.lock import output_lock
with output_lock(sys.argv[1], "prune"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_two_writers_of_one_output_with_overwrite(tiny_llama, tmp_path):
    """`prune ... -o same --overwrite` while another process writes `same`: one line naming its PID, not both
    exiting 0 with the last one winning; once it is gone the output is free (and no lock file stays behind)."""
    out = tmp_path / "same"
    assert invoke("prune", tiny_llama, "--drop", "0", "-o", out).exit_code == 0
    root = Path(__file__).resolve().parent.parent
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OUTPUT, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_line(invoke("prune", tiny_llama, "--drop", "1", "-o", out, "--overwrite"))
        assert f"PID {holder.pid}" in line and "in use" in line
        assert json.loads((out / "draftkit.json").read_text())["facts"]["dropped_layers"] == [0]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert invoke("prune", tiny_llama, "--drop", "1", "-o", out, "--overwrite").exit_code == 0
    assert json.loads((out / "draftkit.json").read_text())["facts"]["dropped_layers"] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"]


def test_a_lock_file_removed_by_its_holder_is_never_shared(tmp_path, monkeypatch):
    """Between our open() and our flock(), the holder finishes, removing the file, and a third process creates
    a new one: we must not end up holding the flock of the removed file (the third process would hold the real
    one, and two processes would write the folder)."""
    from draftkit.errors import LockedError
    from draftkit.lock import LOCK_FILE, folder_lock

    folder = tmp_path / "work"
    folder.mkdir()
    real_open, raced = os.open, []

    def open_then_lose_the_race(path, flags, mode=0o777, **kw):
        fd = real_open(path, flags, mode, **kw)
        if str(path).endswith(LOCK_FILE) and not raced:
            raced.append(path)
            os.unlink(path)  # the holder is done: its lock file goes
            os.close(real_open(path, os.O_RDWR | os.O_CREAT, 0o666))  # a third process makes a new one
        return fd

    monkeypatch.setattr(os, "open", open_then_lose_the_race)
    with folder_lock(folder):
        monkeypatch.undo()
        assert raced
        with pytest.raises(LockedError):  # what we hold is the lock file that is there now
            with folder_lock(folder):
                pass
    assert not (folder / LOCK_FILE).exists()  # released and removed


def test_a_stage_error_keeps_its_type_and_attributes(tiny_llama, calib_file, tmp_path, monkeypatch):
    from draftkit.errors import DataError
    from draftkit.pipeline import run
    from draftkit.recipe import load_recipe

    class RowsError(DataError):
        def __init__(self, message: str, rows: list[int]):
            super().__init__(message)
            self.rows = rows

    def bad_rows(model, tok, cfg):
        raise RowsError("rows 3 and 7 are broken", [3, 7])

    monkeypatch.setattr(draftkit.prune, "prune_model", bad_rows)
    with pytest.raises(RowsError) as exc:
        run(load_recipe(str(write_recipe(tmp_path, tiny_llama, calib_file))))
    assert exc.value.rows == [3, 7] and str(exc.value) == "00-prune: rows 3 and 7 are broken"


# ---- a real process under `timeout -s TERM` (slow) -------------------------------------------------------


def _stage_status(out: Path, index: int) -> str | None:
    try:
        return json.loads((out / "manifest.json").read_text())["stages"][str(index)]["status"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_draftkit_run_under_timeout_sigterm(tiny_llama, calib_file, tmp_path):
    """`timeout -s TERM ... draftkit run`: the TERM reaches draftkit in the middle of stage 1 (sent to `timeout`,
    which passes it on as when its time is up); one line, exit 143, the manifest says `interrupted`, no lock
    file, and the next run resumes: stage 0 skipped, stage 1 run."""
    calib = {"path": str(calib_file), "samples": 64, "seqlen": 64}
    rec = write_recipe(tmp_path, tiny_llama, calib_file, stages=[
        {"prune": {"layers": 1, "calib": {**calib, "samples": 4}}},
        {"sparsify": {"sparsity": 0.5, "method": "sparsegpt", "calib": calib}},
    ])
    out = tmp_path / "run"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "DRAFTKIT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    draftkit_run = [sys.executable, "-m", "draftkit", "run", str(rec), "--quiet"]
    proc = subprocess.Popen(["timeout", "-s", "TERM", "--preserve-status", "600", *draftkit_run], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _stage_status(out, 1) != "running" and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_TERMINATED, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("terminated (SIGTERM):"), err
    assert [_stage_status(out, i) for i in (0, 1)] == ["done", "interrupted"]
    assert not (out / ".draftkit.lock").exists() and not list(out.glob(".*.tmp-*"))

    again = subprocess.run([*draftkit_run[:-1], "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert [s["skipped"] for s in json.loads(again.stdout)["stages"]] == [True, False]
    assert _stage_status(out, 1) == "done" and not (out / ".draftkit.lock").exists()


def test_a_full_disk_in_a_recipe_stage_is_exit_2_in_the_report_too(tiny_llama, calib_file, tmp_path, monkeypatch):
    rec = write_recipe(tmp_path, tiny_llama, calib_file)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "00-prune"))

    monkeypatch.setattr(draftkit.prune, "prune_model", full)
    line = one_line(invoke("run", rec, "--quiet"))
    assert line.startswith("error: 00-prune: ") and "no space left on the device" in line
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["error"]["exit_code"] == EXIT_INVALID_INPUT and report["error"]["type"] == "MachineError"
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["0"]["status"] == "failed"
