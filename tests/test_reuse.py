"""Reuse across nights: regenerated rows shared by runs in different folders (DRAFTKIT_CACHE), the cache's size
limit, and `keep: final`."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from draftkit.cachelimit import enforce_limit, parse_limit
from draftkit.cli import app
from draftkit.errors import InvalidInputError
from draftkit.pipeline import run
from draftkit.recipe import load_recipe
from tests._helpers_export_eval import single_thread, write_jsonl
from tests.conftest import make_rows

runner = CliRunner()
_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def test_regenerated_rows_are_reused_by_a_run_in_another_folder(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTKIT_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(6, seed=1))

    def night(name: str, *extra: str) -> dict:
        res = runner.invoke(app, ["distill", str(tiny_llama), "--teacher", str(tiny_llama), "--dataset", str(data),
                                  "--max-new-tokens", "8", "--max-length", "64", "--eval-fraction", "0",
                                  "--template", "instruction-only", "--max-steps", "1", "-o", str(tmp_path / name),
                                  "--json", *extra])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["regenerate"]

    first = night("night-1")
    assert first["generated_now"] == 6 and first["resumed"] == 0
    second = night("night-2")  # another folder, the same teacher, data and settings: nothing regenerated
    assert second["generated_now"] == 0 and second["resumed"] == 6
    rows = [(tmp_path / f"{n}-work" / "data" / "rows.jsonl").read_text() for n in ("night-1", "night-2")]
    assert rows[0] == rows[1]
    changed = night("night-3", "--max-new-tokens", "6")  # another setting: regenerated
    assert changed["generated_now"] == 6
    assert len(list((tmp_path / "cache" / "rows").iterdir())) == 2


def test_the_cache_keeps_to_its_size_limit(tmp_path):
    root = tmp_path / "cache"
    old, newer, newest = root / "rows" / "a", root / "gguf" / "b", root / "eval" / "c.json"
    for path, size in ((old / "rows.jsonl", 600), (newer / "model.safetensors", 600), (newest, 100)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    for entry, age in ((old, 300), (newer, 200), (newest, 100)):
        t = entry.stat().st_mtime - age
        os.utime(entry, (t, t))
    assert enforce_limit(800, root) == [old]  # 1300 bytes: the least recently used entry goes first
    assert newer.is_dir() and newest.is_file()
    assert enforce_limit(100, root) == [newer]
    assert parse_limit("50GB") == 50 * 10**9 and parse_limit("1.5 GiB") == int(1.5 * 2**30)
    with pytest.raises(InvalidInputError, match="DRAFTKIT_CACHE_LIMIT"):
        parse_limit("lots")


def test_keep_final_keeps_the_final_draft_and_the_reports(tiny_llama, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", make_rows(2, seed=5))
    recipe = {"name": "k", "model": str(tiny_llama), "output": str(tmp_path / "run"), "keep": "final",
              "load": {"device": "cpu"},
              "stages": [{"prune": {"drop": "1"}}, {"prune": {"drop": "1"}},
                         {"spec": {"target": str(tiny_llama), "prompts": str(prompts), "limit": 1, "max_new_tokens": 6}}]}
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(recipe))
    report = run(load_recipe(str(path)))
    out = tmp_path / "run"
    assert not (out / "00-prune").exists() and (out / "01-prune" / "config.json").is_file()
    assert (out / "02-spec" / "report.json").is_file() and (out / "report.md").is_file()
    assert report["removed"] == [str(out / "00-prune")] and report["final_model"] == str(out / "01-prune")
    assert json.loads((out / "report.json").read_text())["kept"] == "final"
    assert {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")} <= {"01-prune", "02-spec", "plots"}
