"""`draftkit distill` in its three spellings, and each kind of bad input: one line, non-zero exit,
nothing lost."""

import errno
import importlib
import json

import pytest
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.distill.regenerate import HFEngine
from tests._helpers_distill import no_template_model, one_thread, sft_file, write_jsonl

FIXTURES = (no_template_model, one_thread, sft_file)  # pytest finds fixtures by name in this module
pytestmark = pytest.mark.usefixtures("one_thread")
regen_mod = importlib.import_module("draftkit.distill.regenerate")

FAST = ["--max-new-tokens", "4", "--batch-size", "4", "--max-steps", "2", "--train-batch-size", "4", "--lr", "1e-3"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, code, *needles):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith(("error:", "interrupted"))]
    assert len(lines) == 1, result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_three_spellings(tiny_llama, tiny_models, sft_file, tmp_path):
    student = tiny_models["qwen2"]  # another family and tokenizer than the teacher: the exchange is text
    out = tmp_path / "both"
    r = invoke("distill", student, "--teacher", tiny_llama, "--dataset", sft_file, "-o", out, *FAST, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["regenerate"]["rows"] == 12 and report["train"]["steps"] == 2
    assert (out / "model.safetensors").is_file() and (tmp_path / "both-work" / "data" / "rows.jsonl").is_file()
    prov = json.loads((out / "draftkit.json").read_text())
    assert prov["stage"] == "distill" and prov["arguments"]["config"]["teacher"] == str(tiny_llama)

    rows = tmp_path / "rows"
    r = invoke("distill", "regenerate", "--teacher", tiny_llama, "--dataset", sft_file, "-o", rows,
               "--max-new-tokens", "4", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"] == 12 and (rows / "rows.jsonl").is_file() and (rows / "regenerate.json").is_file()

    r = invoke("distill", "train", student, "--dataset", rows, "-o", tmp_path / "trained", "--max-steps", "2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["train"]["examples"] == 12 and (tmp_path / "trained" / "config.json").is_file()

    r = invoke("distill", "run", student, "--dataset", sft_file, "--no-regenerate", "-o", tmp_path / "sft", *FAST, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["regenerated"] is False
    assert "Commands" in invoke("distill", "--help").output


def test_dataset_without_needed_columns(tiny_llama, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"q": "2+2?", "a": "4"}])
    r = invoke("distill", tiny_llama, "--teacher", tiny_llama, "--dataset", bad, "-o", tmp_path / "o")
    one_line_error(r, 2, "columns found: ['a', 'q']", "--columns prompt=COL")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-work").exists()
    r = invoke("distill", tiny_llama, "--teacher", tiny_llama, "--dataset", bad, "--columns", "prompt=q", "-o", tmp_path / "o")
    one_line_error(r, 2, "columns", "response=COL")


def test_empty_dataset(tiny_llama, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = invoke("distill", "regenerate", "--teacher", tiny_llama, "--dataset", empty, "-o", tmp_path / "o")
    one_line_error(r, 2, "empty")
    assert not (tmp_path / "o").exists()


def test_teacher_that_cannot_load(tiny_llama, sft_file, tmp_path):
    r = invoke("distill", tiny_llama, "--teacher", tmp_path / "nope", "--dataset", sft_file, "-o", tmp_path / "o")
    one_line_error(r, 2, "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    r = invoke("distill", "regenerate", "--teacher", broken, "--dataset", sft_file, "-o", tmp_path / "o")
    one_line_error(r, 2, "broken")
    assert not (tmp_path / "o").exists()


def test_teacher_without_chat_template_falls_back(no_template_model, sft_file, tmp_path):
    r = invoke("distill", "regenerate", "--teacher", no_template_model, "--dataset", sft_file, "-o", tmp_path / "o",
               "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    assert "has no chat template" in r.output and "plain" in r.output
    assert len((tmp_path / "o" / "rows.jsonl").read_text().splitlines()) == 12


def test_ctrl_c_keeps_rows_and_resumes(tiny_llama, sft_file, tmp_path, monkeypatch):
    real = HFEngine.generate

    def interrupted(self, prompts):
        for i, group in enumerate(real(self, prompts)):
            yield group
            if i == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(HFEngine, "generate", interrupted)
    args = ["distill", "regenerate", "--teacher", tiny_llama, "--dataset", sft_file, "-o", tmp_path / "o",
            "--max-new-tokens", "3", "--batch-size", "4"]
    one_line_error(invoke(*args), 130, "re-run to resume")
    kept = len((tmp_path / "o" / "rows.jsonl").read_text().splitlines())
    assert 0 < kept < 12
    monkeypatch.setattr(HFEngine, "generate", real)
    r = invoke(*args, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["resumed"] == kept and report["generated_now"] == 12 - kept


def test_disk_full_keeps_rows_and_resumes(tiny_llama, sft_file, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = regen_mod.os.fsync

    def fills_up(fd):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(regen_mod.os, "fsync", fills_up)
    args = ["distill", "regenerate", "--teacher", tiny_llama, "--dataset", sft_file, "-o", tmp_path / "o",
            "--max-new-tokens", "3", "--batch-size", "8"]
    one_line_error(invoke(*args), 2, "No space left on device", "re-run to resume")
    lines = (tmp_path / "o" / "rows.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(x) for x in lines)  # the first group, whole
    monkeypatch.setattr(regen_mod.os, "fsync", real)
    r = invoke(*args, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["generated_now"] == 4


def test_bad_settings_are_one_line(tiny_llama, sft_file, tmp_path):
    r = invoke("distill", tiny_llama, "--teacher", tiny_llama, "--dataset", sft_file, "--template", "no fields",
               "-o", tmp_path / "o")
    one_line_error(r, 2, "template", "{instruction}")
    r = invoke("distill", tiny_llama, "--dataset", sft_file, "-o", tmp_path / "o")
    one_line_error(r, 2, "teacher is required")
    r = invoke("distill", tiny_llama, "--teacher", tiny_llama, "--dataset", sft_file, "--engine", "tgi", "-o", tmp_path / "o")
    one_line_error(r, 2, "engine")
