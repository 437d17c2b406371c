"""What a new user hit on a nightly job (issue 24, item 5), each with the behaviour that was wrong before:
``eval --ppl --limit``, umask-respecting model files, a GGUF converted once per file content, the
``smollm2-135m-instruct`` alias, the ``gguf`` extra without mypy, shipped recipes naming data by ``${recipe_dir}``."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from typer.testing import CliRunner

import draftkit.checkpoint.load as load_module
from draftkit.checkpoint import load_config, load_model_and_tokenizer
from draftkit.cli import app
from draftkit.recipe import shipped_recipes
from draftkit.refs import resolve_model_ref
from tests._helpers_export_eval import single_thread, write_jsonl
from tests.conftest import make_rows

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def test_eval_ppl_honours_limit(tiny_llama, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", make_rows(12, seed=2))
    args = ["eval", str(tiny_llama), "--ppl", str(rows), "--ppl-seqlen", "64", "--json"]
    full = json.loads(runner.invoke(app, args).stdout)["tasks"]["perplexity"]
    res = runner.invoke(app, args + ["--limit", "3"])
    assert res.exit_code == 0, res.output
    limited = json.loads(res.stdout)["tasks"]["perplexity"]
    assert full["rows"] == 12 and limited["rows"] == 3 and limited["tokens"] < full["tokens"]


@pytest.mark.parametrize("argv", [["sparsify", "--sparsity", "0.5", "--method", "magnitude"], ["export"]])
def test_model_files_follow_the_umask(argv, tiny_llama, tmp_path):
    old = os.umask(0o022)
    try:  # safetensors writes through a private temporary file: model.safetensors was 0600
        res = runner.invoke(app, [argv[0], str(tiny_llama), *argv[1:], "-o", str(tmp_path / "out")])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_a_gguf_file_is_converted_once_per_content(tiny_gguf, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("DRAFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    reads = []
    real = load_module._load_pretrained

    def counting(ref, dtype, trust):
        reads.append(ref.kind)
        return real(ref, dtype, trust)

    monkeypatch.setattr(load_module, "_load_pretrained", counting)
    first, tok = load_model_and_tokenizer(str(tiny_gguf), device="cpu")
    assert reads.count("gguf") == 1
    copy = tmp_path / "same-bytes.gguf"  # another path, the same content: the same cached folder
    copy.write_bytes(tiny_gguf.read_bytes())
    second, tok2 = load_model_and_tokenizer(str(copy), device="cpu")
    cfg = load_config(str(copy))
    assert reads.count("gguf") == 1  # neither the model, the tokenizer nor the config read the GGUF again
    assert cfg.num_hidden_layers == first.config.num_hidden_layers
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "What is 2 + 3?"
    assert tok(text)["input_ids"] == tok2(text)["input_ids"] and tok.chat_template == tok2.chat_template
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1


def test_smollm2_135m_instruct_alias():
    assert resolve_model_ref("smollm2-135m-instruct").location == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_gguf_extra_installs_no_mypy():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(req.startswith("mypy") for req in extras["gguf"])


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def test_shipped_recipes_name_local_files_by_recipe_dir():
    for name, path in shipped_recipes().items():
        data = yaml.safe_load(path.read_text())
        for value in _strings(data["stages"]):
            if re.search(r"\.(jsonl|json|txt|csv|parquet)$", value) or value.startswith((".", "/")):
                assert value.startswith("${recipe_dir}"), f"{name}: {value} depends on the working directory"
