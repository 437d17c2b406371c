"""`draftkit prune` and friends through Typer's CliRunner: bad input is one line, a distinct exit code,
and nothing written."""

import json

import pytest
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.errors import EXIT_INVALID_INPUT

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles):
    assert result.exit_code == EXIT_INVALID_INPUT, (result.exit_code, result.output)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_prune_cli_json_report(tiny_llama, calib_file, tmp_path):
    out = tmp_path / "out"
    r = run("prune", tiny_llama, "--layers", 2, "--calib", calib_file, "--samples", 4, "--seqlen", 32, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["layers_after"] == 4 and len(report["dropped_layers"]) == 2
    assert (out / "model.safetensors").is_file() and (out / "draftkit.json").is_file()
    assert not list(tmp_path.glob(".out.tmp-*"))  # no temporary directory left behind


def test_prune_cli_table_and_plot(tiny_llama, calib_file, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "d.png"
    r = run("prune", tiny_llama, "--layers", 1, "--calib", calib_file, "--samples", 4, "--seqlen", 32,
            "-o", tmp_path / "o", "--plot", png)
    assert r.exit_code == 0, r.output
    assert "dropped layers" in r.stdout and "angular distance" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_model_path(tmp_path):
    r = run("prune", tmp_path / "nope", "--layers", 2, "-o", tmp_path / "o")
    assert_one_line_error(r, "no such model directory")
    assert not (tmp_path / "o").exists()


def test_non_model_path(tmp_path):
    (tmp_path / "d").mkdir()
    r = run("prune", tmp_path / "d", "--layers", 2, "-o", tmp_path / "o")
    assert_one_line_error(r, "not a model directory")
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert_one_line_error(run("prune", f, "--layers", 2, "-o", tmp_path / "o"), "not a model directory")
    assert not (tmp_path / "o").exists()


def test_unknown_name_suggests_alias(tmp_path):
    r = run("prune", "llama-3.1-8", "--layers", 2, "-o", tmp_path / "o")
    assert_one_line_error(r, "llama-3.1-8b")


@pytest.mark.parametrize("layers", [0, 6, 9])
def test_layers_out_of_range(layers, tiny_llama, calib_file, tmp_path):
    r = run("prune", tiny_llama, "--layers", layers, "--calib", calib_file, "-o", tmp_path / "o")
    assert_one_line_error(r, "layers")
    assert not (tmp_path / "o").exists()


def test_layers_and_drop_exclusive(tiny_llama, tmp_path):
    assert_one_line_error(run("prune", tiny_llama, "--layers", 1, "--drop", "1-2", "-o", tmp_path / "o"), "exactly one")
    assert_one_line_error(run("prune", tiny_llama, "--drop", "4-9", "-o", tmp_path / "o"), "0-5")


def test_unknown_method(tiny_llama, tmp_path):
    assert_one_line_error(run("prune", tiny_llama, "--layers", 1, "--method", "random", "-o", tmp_path / "o"), "method")


def test_unsupported_architecture(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, is_decoder=True)
    BertLMHeadModel(cfg).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    r = run("prune", tmp_path / "bert", "--drop", "0", "-o", tmp_path / "o")
    assert_one_line_error(r, "bert")
    assert not (tmp_path / "o").exists()


def test_empty_calibration_file(tiny_llama, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_one_line_error(run("prune", tiny_llama, "--layers", 1, "--calib", empty, "-o", tmp_path / "o"), "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    assert_one_line_error(run("prune", tiny_llama, "--layers", 1, "--calib", bad, "-o", tmp_path / "o"), "bad.jsonl:2")
    missing = tmp_path / "missing.jsonl"
    assert_one_line_error(run("prune", tiny_llama, "--layers", 1, "--calib", missing, "-o", tmp_path / "o"), "does not exist")
    assert not (tmp_path / "o").exists()


def test_output_exists_needs_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_one_line_error(run("prune", tiny_llama, "--drop", "1", "-o", out), "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite replaces only a draftkit output (#13): a folder of the user's own stays untouched
    assert_one_line_error(run("prune", tiny_llama, "--drop", "1", "-o", out, "--overwrite"), "not a draftkit output")
    assert (out / "keep.txt").read_text() == "precious"
    assert run("prune", tiny_llama, "--drop", "1", "-o", tmp_path / "d").exit_code == 0
    out = tmp_path / "d"
    (out / "keep.txt").write_text("stale")
    r = run("prune", tiny_llama, "--drop", "1", "-o", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_never_overwrites_input(tiny_llama):
    assert_one_line_error(run("prune", tiny_llama, "--drop", "1", "-o", tiny_llama, "--overwrite"), "input")


def test_traceback_with_debug(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTKIT_DEBUG", "1")
    r = run("prune", tmp_path / "nope", "--layers", 2)
    assert r.exit_code == EXIT_INVALID_INPUT
    assert "Traceback" in r.stderr


def test_inspect_and_models(tiny_llama, tmp_path):
    r = run("prune", tiny_llama, "--drop", "0", "-o", tmp_path / "p")
    assert r.exit_code == 0
    r = run("inspect", tmp_path / "p", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["layers"] == 5 and info["model_type"] == "llama"
    assert info["provenance"]["stage"] == "prune" and info["provenance"]["facts"]["dropped_layers"] == [0]
    assert info["linear_sparsity"] == 0.0
    r = run("models", "--json")
    assert json.loads(r.stdout)["llama-3.1-8b"] == "meta-llama/Llama-3.1-8B"


def test_prune_cli_options_match_config_fields():
    """One schema: every PruneConfig field (and nested calib field) is a CLI option of the same name."""
    import typer.main

    from draftkit.prune import PruneConfig

    cmd = typer.main.get_command(app).commands["prune"]
    opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
    for field in PruneConfig.model_fields:
        if field == "calib":
            continue
        assert "--" + field.replace("_", "-") in opts, field
    for flag in ("--calib", "--samples", "--seqlen", "--split"):
        assert flag in opts


def test_version_and_bare_help():
    from draftkit import __version__

    r = run("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"draftkit {__version__}"
    r = runner.invoke(app, [])  # bare `draftkit` shows the help (click's usage exit code)
    assert r.exit_code in (0, 2) and "prune" in r.output and "sparsify" in r.output and "Traceback" not in r.output


def test_plot_without_matplotlib_fails_before_any_work(tiny_llama, tmp_path, monkeypatch):
    import sys

    import draftkit.prune

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(draftkit.prune, "prune_model", lambda *a: pytest.fail("pruned before the plot was checked"))
    out = tmp_path / "out"
    r = run("prune", tiny_llama, "--drop", "2", "-o", out, "--plot", tmp_path / "d.png")
    assert_one_line_error(r, "matplotlib")
    assert not out.exists()


def test_output_help_says_where_the_default_goes(tiny_llama, tmp_path, monkeypatch):
    from draftkit.cli._common import default_output

    r = run("prune", "--help")
    assert "current folder" in " ".join(r.stdout.split())
    monkeypatch.chdir(tmp_path)
    assert default_output(str(tiny_llama), "prune2").resolve() == tmp_path / f"{tiny_llama.name}-prune2"
