"""Local tasks that run offline: the demo task (exact match on the demo test split through the chat
template). Perplexity lives in :mod:`draftkit.evaluate.perplexity` (re-exported here)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from draftkit import console
from draftkit.answers import extract_answer
from draftkit.data import RENAME_FIX, detect_columns, read_rows, render_chat, row_messages, row_place
from draftkit.errors import DataError
from draftkit.evaluate.perplexity import perplexity
from draftkit.resources import demo_data

__all__ = ["LOCAL_TASKS", "extract_answer", "perplexity", "tiny_arith"]

LOCAL_TASKS = ("tiny-arith",)
DEMO_TEST = demo_data() / "test.jsonl"  # shipped with the package (draftkit/resources.py)


def _prompt_ids(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(texts, add_special_tokens=not has_template, padding=True, return_tensors="pt")


@torch.no_grad()
def tiny_arith(model, tokenizer, *, data: str | Path | None = None, limit: int | None = None,
               batch_size: int = 16, max_new_tokens: int = 128) -> dict[str, Any]:
    """Exact match of the answer after ``####`` on rows with question/answer columns (greedy, chat template).

    Returns ``{"exact_match": float, "n": int, "answer_parsed_rate": float}``.
    """
    path = Path(data) if data else DEMO_TEST
    if not path.is_file():
        raise DataError(f"tiny-arith data {path} not found: pass --arith-data FILE.jsonl (question/answer rows)")
    rows = read_rows(str(path))
    mapping = detect_columns(rows, fix=RENAME_FIX)
    if "prompt" not in mapping and "messages" not in mapping:
        raise DataError(f"{path}: tiny-arith needs question/answer (or prompt/response) rows")
    rows = rows[:limit] if limit else rows
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    correct = parsed = 0
    try:
        for s in console.track(range(0, len(rows), batch_size), "tiny-arith", total=math.ceil(len(rows) / batch_size)):
            chunk = rows[s : s + batch_size]
            prompts, refs = [], []
            for j, r in enumerate(chunk):
                msgs = row_messages(r, mapping, row_place(rows, s + j))
                prompts.append(render_chat(tokenizer, msgs[:-1], add_generation_prompt=True))
                refs.append(extract_answer(msgs[-1]["content"]))
            enc = {k: v.to(device) for k, v in _prompt_ids(tokenizer, prompts).items()}
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            for ref, gen in zip(refs, out[:, enc["input_ids"].shape[1]:], strict=True):
                pred = extract_answer(tokenizer.decode(gen, skip_special_tokens=True))
                parsed += pred is not None
                correct += pred is not None and pred == ref
    finally:
        tokenizer.padding_side = side
    n = len(rows)
    return {"exact_match": correct / n, "n": n, "answer_parsed_rate": parsed / n}
