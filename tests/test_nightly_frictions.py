"""What a new user hit on a nightly job (issue 24, item 5), each with the behaviour that was wrong before:
``eval --ppl --limit``, umask-respecting model files, a GGUF converted once per file content, the
``smollm2-135m-instruct`` alias, the ``gguf`` extra without mypy, shipped recipes naming data by ``${recipe_dir}``."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
import warnings
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


# Runs draftkit's entry point counting the name lookups of the hub host: one (draftkit's probe) when the
# failure is at once; every retry of the libraries looks the name up again.
COUNTING_MAIN = """
import atexit, socket, sys
real, lookups = socket.getaddrinfo, []
def counting(host, *a, **k):
    if host == "hub.invalid":
        lookups.append(host)
    return real(host, *a, **k)
socket.getaddrinfo = counting
atexit.register(lambda: sys.stderr.write(f"\\nHUB_LOOKUPS={len(lookups)}\\n"))
sys.argv = ["draftkit", *sys.argv[1:]]
from draftkit.cli import main
main()
"""


def _offline_env() -> dict[str, str]:
    """A hub that cannot be reached (a name that never resolves), offline mode not asked for."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_ENDPOINT": "https://hub.invalid", "DRAFTKIT_THREADS": "1", "DRAFTKIT_NO_PROGRESS": "1",
            "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("argv", [["prune", "--layers", "1", "--calib", "nobody/no-such-data"],
                                  pytest.param(["eval", "--tasks", "arc_easy", "--limit", "2"],
                                               marks=pytest.mark.slow)])  # lm-eval's import and task index: ~50 s
def test_unreachable_hub_data_fails_at_once_in_one_line(argv, tiny_llama, tmp_path):
    if argv[0] == "eval":
        pytest.importorskip("lm_eval")
    cmd = [sys.executable, "-c", COUNTING_MAIN, argv[0], str(tiny_llama), *argv[1:], "-o", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(), timeout=300, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "internal error:"))]
    assert proc.returncode == 2, proc.stderr[-2000:]  # lm-eval was `internal error: ConnectionError`, exit 1
    assert len(errors) == 1 and "hub.invalid" in errors[0] and "cannot be reached" in errors[0], proc.stderr[-2000:]
    lookups = int(proc.stderr.rsplit("HUB_LOOKUPS=", 1)[1].split()[0])
    assert lookups <= 1, f"{lookups} lookups of the hub: it was retried (28-58 s before)"
    assert not (tmp_path / "out").exists()


def test_input_errors_are_named_before_the_output_check(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "tiny-prune"
    out.mkdir()
    (out / "notes.txt").write_text("a previous output")
    res = runner.invoke(app, ["prune", str(tmp_path / "tiny-typo"), "--layers", "1", "-o", str(out)])
    assert res.exit_code == 2 and "no such model directory" in res.stderr and "exists" not in res.stderr
    loads = []
    monkeypatch.setattr(load_module, "_load_pretrained", lambda *a: loads.append(a))
    res = runner.invoke(app, ["prune", str(tiny_llama), "--layers", "1", "--calib", str(tmp_path / "missing.jsonl"),
                              "-o", str(out)])
    assert res.exit_code == 2 and "missing.jsonl does not exist" in res.stderr and "exists:" not in res.stderr
    assert loads == []  # before the model loads
    assert (out / "notes.txt").read_text() == "a previous output"


def test_library_noise_is_silenced_unless_verbose(tiny_gguf, tmp_path, monkeypatch, capfd):
    """The GGUF reader's progress bar, lm-eval's "pretrained model kwarg is not of type str" and transformers'
    "is_gradient_checkpointing is deprecated" (read by peft on LoRA runs) show only with --verbose."""
    pytest.importorskip("gguf")
    from draftkit import console

    monkeypatch.delenv("DRAFTKIT_NO_PROGRESS", raising=False)
    monkeypatch.setenv("DRAFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    console.set_verbose(False)
    model, tok = load_model_and_tokenizer(str(tiny_gguf), device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        assert model.is_gradient_checkpointing is False
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    if importlib.util.find_spec("lm_eval") is not None:
        from lm_eval.models.huggingface import HFLM

        HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    err = capfd.readouterr().err
    assert "it/s]" not in err and "%|" not in err, err  # no tqdm bar
    assert "kwarg is not of type" not in err and "already-initialized model" not in err, err


def test_help_says_what_distill_does():
    from draftkit.distill.config import DistillConfig

    top = runner.invoke(app, ["distill", "--help"])
    assert top.exit_code == 0
    assert "--teacher" in top.stdout and "--lr" in top.stdout and "same as `distill run`" in top.stdout
    run_help = runner.invoke(app, ["distill", "run", "--help"]).stdout
    # one default for the work dir, the one the command uses (OUT-work), in its text and in its option
    assert "OUT-work" in DistillConfig.model_fields["work_dir"].description
    assert "default: a temporary folder" not in " ".join(run_help.split())


def test_distill_without_an_eval_split_prints_no_eval_loss(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(4, seed=1))
    res = runner.invoke(app, ["distill", "train", str(tiny_llama), "--dataset", str(data), "--eval-fraction", "0",
                              "--max-length", "48", "--train-batch-size", "2", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "trained" in res.stdout and "eval loss" not in res.stdout and "None" not in res.stdout
