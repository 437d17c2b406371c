"""The SFT rows: reading a dataset as prompt/reference examples, the teacher's prompts, and the rows
file that regeneration appends to (``rows.jsonl``, one fsync'd write per group, so an interruption keeps
every finished row and a re-run resumes where it stopped; a torn last line is cut off on resume).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftkit import console
from draftkit.data import detect_columns, normalise_messages, read_rows, render_chat, row_place
from draftkit.distill.config import COLUMNS_SYNTAX, DistillConfig
from draftkit.distill.templates import fill_template
from draftkit.errors import DataError
from draftkit.textcap import TextCap

ROWS_FILE = "rows.jsonl"
REPORT_FILE = "regenerate.json"


# --------------------------------------------------------------------------------------------
# Reading the SFT rows
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One SFT row: the conversation before the response, and the reference response."""

    index: int
    id: str
    prompt: list[dict[str, str]]  # messages before the response; the last one is the user's
    reference: str

    @property
    def instruction(self) -> str:
        return self.prompt[-1]["content"]


def load_examples(cfg: DistillConfig) -> list[Example]:
    """Rows of ``cfg.dataset`` as :class:`Example` (column mapping guessed or from ``cfg.columns``).

    Raises:
        DataError: the data is missing, empty or has no prompt/response columns (the message lists the
            columns found and the ``--columns`` syntax).
    """
    assert cfg.dataset is not None
    rows = read_rows(cfg.dataset, split=cfg.split)
    if cfg.limit:
        rows = rows[: cfg.limit]
    try:
        mapping = detect_columns(rows, cfg.column_map())
    except DataError as exc:
        raise DataError(f"{cfg.dataset}: {exc}".replace("(or messages=COL, or text=COL)", "(or messages=COL)")) from None
    if "text" in mapping:
        found = sorted(set().union(*(r.keys() for r in rows[:100])))
        raise DataError(
            f"{cfg.dataset}: distillation needs prompt and response columns, found only plain text; "
            f"columns found: {found}; pass {COLUMNS_SYNTAX}"
        )
    examples = []
    for i, row in enumerate(rows):
        prompt, reference = _split_row(row, mapping, row_place(rows, i))
        if prompt is None or not reference.strip():
            continue
        key = hashlib.sha256(json.dumps([prompt, reference], sort_keys=True).encode()).hexdigest()[:12]
        examples.append(Example(i, f"{i}-{key}", prompt, reference))
    if not examples:
        raise DataError(f"{cfg.dataset}: no row has both a prompt and a non-empty response")
    return examples


def _split_row(row: dict[str, Any], mapping: dict[str, Any], where: str) -> tuple[list[dict[str, str]] | None, str]:
    if "messages" in mapping:
        msgs = normalise_messages(row.get(mapping["messages"]), where)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None or last == 0 or msgs[last - 1]["role"] != "user":
            return None, ""
        return msgs[:last], msgs[last]["content"]
    prompt = "\n\n".join(str(row[c]) for c in mapping["prompt"] if row.get(c) not in (None, ""))
    if not prompt.strip():
        return None, ""
    response = row.get(mapping["response"])
    return [{"role": "user", "content": prompt}], "" if response is None else str(response)


# --------------------------------------------------------------------------------------------
# Prompts for the teacher
# --------------------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def teacher_prompt_ids(tokenizer, example: Example, template: str, cap: TextCap | None = None) -> list[int]:
    """Token ids of the teacher's prompt: the filled template as the last user turn, through the teacher's
    chat template (or the plain ``User:/Assistant:`` fallback, with the tokenizer's BOS). With ``cap``, texts
    longer than training can ever use are cut as text first."""
    msgs = [*example.prompt[:-1], {"role": "user", "content": fill_template(template, example.instruction, example.reference)}]
    msgs = cap.messages(msgs) if cap is not None else msgs
    text = render_chat(tokenizer, msgs, add_generation_prompt=True)
    if not has_chat_template(tokenizer):
        text += " "
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]



# --------------------------------------------------------------------------------------------
# The rows file
# --------------------------------------------------------------------------------------------


def read_done_rows(path: Path) -> list[dict[str, Any]]:
    """Rows already in ``path``; a torn last line (from a crash mid-write) is cut off the file."""
    if not path.exists():
        return []
    rows, good = [], 0
    with path.open("rb") as f:
        data = f.read()
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good < len(data):
        console.warn(f"{path}: cutting {len(data) - good} bytes of an unfinished last row")
        with path.open("r+b") as f:
            f.truncate(good)
    return rows


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to a JSONL file in one write + fsync; on failure the file is cut back to where it was."""
    if not rows:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with path.open("ab") as f:
        start = f.tell()
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException as exc:
            try:
                f.truncate(start)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise DataError(
                    f"could not write {path}: {exc.strerror or exc}; the rows finished so far are kept, "
                    "free some space and re-run to resume"
                ) from None
            raise
