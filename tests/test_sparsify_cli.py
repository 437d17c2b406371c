"""``draftkit sparsify`` end to end and with each bad input: one line, exit 2, nothing written."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.sparsify.masks import is_nm_sparse, model_sparsity

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["sparsify", *map(str, args)])


def test_cli_writes_a_2of4_model_with_provenance(tiny_llama, calib_file, tmp_path):
    out = tmp_path / "sp"
    res = run(tiny_llama, "--pattern", "2:4", "--calib", calib_file, "--samples", 4, "--seqlen", 48, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["sparsity"] == pytest.approx(0.5) and report["pattern"] == "2:4"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model_sparsity(model)["overall"] == pytest.approx(0.5)
    assert all(is_nm_sparse(m.weight, 2, 4) for n, m in model.named_modules() if n.endswith("proj"))
    assert torch.count_nonzero(model.lm_head.weight) == model.lm_head.weight.numel()
    prov = json.loads((out / "draftkit.json").read_text())
    assert prov["stage"] == "sparsify" and prov["arguments"]["config"]["pattern"] == "2:4"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--sparsity", "1.0"], "sparsity"),
        (["--sparsity", "-0.1"], "sparsity"),
        (["--pattern", "4:2"], "0 < N < M"),
        (["--pattern", "2:4:8"], "N:M"),
        (["--pattern", "2:3"], "does not divide"),
        (["--pattern", "2:4", "--sparsity", "0.7"], "drop sparsity"),
        (["--targets", "no_such_module"], "match no linear"),
        (["--targets", "(unclosed"], "regular expression"),
        (["--seqlen", "200"], "fewer than one sequence"),
    ],
)
def test_cli_bad_input(args, needle, tiny_llama, tmp_path):
    calib = tmp_path / "short.jsonl"
    calib.write_text(json.dumps({"text": "just a few words of calibration text"}) + "\n")
    out = tmp_path / "out"
    res = run(tiny_llama, "--calib", calib, "--samples", 2, "-o", out, *args)
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.count("\n") == 0 and "error" in err and needle in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_already_sparser_warns_and_keeps_going(tiny_llama, calib_file, tmp_path):
    first = tmp_path / "m50"
    assert run(tiny_llama, "--method", "magnitude", "--sparsity", 0.5, "-o", first).exit_code == 0
    res = run(first, "--method", "magnitude", "--sparsity", 0.3, "-o", tmp_path / "m30")
    assert res.exit_code == 0, res.output
    assert "already" in res.stderr and (tmp_path / "m30" / "config.json").is_file()
