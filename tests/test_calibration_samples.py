"""How a data file becomes calibration windows: plain text reads like the text, chat rows are packed with EOS."""

from __future__ import annotations

import json

import torch
from transformers import AutoTokenizer

from draftkit.data import CalibConfig, calibration_samples


def _paragraphs(n: int) -> list[str]:
    return [f"Paragraph {i} says that {i} plus {i} is {2 * i}.\nIts second line repeats {i}." for i in range(n)]


def test_plain_text_windows_have_no_eos_and_read_like_the_text(tiny_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    paras = _paragraphs(40)
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras) + "\n")
    chunks = calibration_samples(tok, CalibConfig(path=str(path), samples=4, seqlen=64, seed=3))
    assert len(chunks) == 4 and all(len(c) == 64 for c in chunks)
    ids = torch.cat(chunks)
    assert int((ids == tok.eos_token_id).sum()) == 0  # draftkit 0.1 put an EOS after every paragraph
    text = tok.decode(ids, skip_special_tokens=True)
    # every whole paragraph in the windows is one of the file's, followed by the blank line of the file
    inner = text.split("\n\n")[1:-1]
    assert inner and all(p in paras for p in inner)


def test_chat_rows_are_packed_with_eos_between_rows(tiny_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"#### {2 * i}"}) + "\n"
                            for i in range(30)))
    chunks = calibration_samples(tok, CalibConfig(path=str(path), samples=2, seqlen=64))
    ids = torch.cat(chunks)
    eos = ids == tok.eos_token_id
    # the template ends each turn with </s>; the packing adds one more between rows: </s></s>
    assert int((eos[:-1] & eos[1:]).sum()) >= 2
