"""Fixtures for the distill tests: small SFT files and a tokenizer copy without a chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sft") / "train.jsonl", make_rows(12, seed=5))


@pytest.fixture(scope="session")
def no_template_model(tmp_path_factory, tiny_llama) -> Path:
    """The tiny llama with its chat template removed."""
    out = tmp_path_factory.mktemp("notemplate") / "llama"
    shutil.copytree(tiny_llama, out)
    for name in ("chat_template.jinja",):
        (out / name).unlink(missing_ok=True)
    cfg = out / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    return out


@pytest.fixture
def one_thread():
    """Run on one torch thread: the tiny models are overhead-bound, and the CI machine is shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
