"""A search's candidates spread over two processes (torchrun, gloo on CPUs): each process builds and measures its
own candidates, trains them alone (not one data-parallel group mixing two candidates' gradients), shared steps are
built once, and the first process writes the one report, equal to a one-process search's."""

from __future__ import annotations

import json

import pytest

from tests.test_distill_multiprocess import torchrun
from tests.test_search import DATA, TEACHER, invoke


def args(out, work) -> list:
    return ["search", TEACHER, "--drop", "1,2", "--healing", "sft", "--dataset", DATA / "train.jsonl", "--rows", 16,
            "--prompts", DATA / "test.jsonl", "--prompt-limit", 4, "--max-new-tokens", 16, "--calib",
            DATA / "train.jsonl", "--samples", 8, "--seqlen", 64, "--train-batch-size", 8, "--max-length", 96,
            "--speedup-engine", "none", "--compute-dtype", "float32", "--work-dir", work, "-o", out]


@pytest.mark.slow
def test_two_processes_split_the_candidates(tmp_path):
    r = torchrun(2, *args(tmp_path / "two", tmp_path / "two-work"))
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())["report"]
    one_run = invoke(*args(tmp_path / "one", tmp_path / "one-work"), "--threads", 1)
    assert one_run.exit_code == 0, one_run.output
    one = json.loads((tmp_path / "one" / "report.json").read_text())["report"]

    assert two["processes"] == 2 and one["processes"] == 1
    assert {c["process"] for c in two["candidates"]} == {0, 1}  # each process measured its own candidate
    manifest = json.loads((tmp_path / "two-work" / "manifest.json").read_text())["stages"]
    for c1, c2 in zip(one["candidates"], two["candidates"], strict=True):
        assert c1["name"] == c2["name"]
        train = manifest[c2["steps"][-1]]["report"]["train"]
        assert train["processes"] == 1  # trained alone, not in a 2-process DDP group with the other candidate
        assert c2["mal_per_step"] == pytest.approx(c1["mal_per_step"], abs=0.05)
    assert sorted(p.name for p in (tmp_path / "two" / "drafts").iterdir()) == ["d1-dense-sft", "d2-dense-sft"]
