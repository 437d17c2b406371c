"""Datasets for calibration and fine-tuning: local files or hub ids, column mapping, chat templates.

A data source is a local ``.txt``/``.jsonl``/``.json``/``.parquet``/``.csv`` file or a hub dataset
id written ``owner/name`` or ``owner/name:config`` (the split is a separate setting).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from draftkit.errors import DataError
from draftkit.textcap import TextCap

LOCAL_SUFFIXES = {".txt", ".jsonl", ".json", ".parquet", ".csv"}

# (prompt columns, response column) pairs recognised without --columns, tried in order.
KNOWN_SHAPES: list[tuple[tuple[str, ...], str]] = [
    (("instruction", "input"), "output"),  # Alpaca
    (("instruction", "context"), "response"),  # Dolly
    (("question",), "answer"),  # GSM8K
    (("prompt",), "completion"),
    (("prompt",), "response"),
    (("query",), "response"),
    (("problem",), "solution"),  # MATH
]


class CalibConfig(BaseModel):
    """Calibration data: where it comes from and how much of it to use."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None,
        description="local .txt/.jsonl/.json/.parquet/.csv file or hub dataset id (owner/name[:config]); "
        "default: wikitext-2 from the hub",
    )
    split: str = Field("train", description="dataset split for hub datasets")
    samples: int = Field(128, ge=1, description="number of calibration sequences")
    seqlen: int = Field(2048, ge=8, description="tokens per sequence (capped by the model's context)")
    seed: int = Field(0, description="seed for choosing and shuffling samples")


DEFAULT_CALIB = "Salesforce/wikitext:wikitext-2-raw-v1"


class Rows(list):
    """The rows of one data source, remembering where each came from: ``file:line`` for JSON Lines, ``source row
    N`` otherwise, so a bad row is named where the user can find it. Slices keep the places."""

    def __init__(self, items: Any = (), source: str = "the data", lines: list[int] | None = None):
        super().__init__(items)
        self.source = source
        self.lines = lines

    def where(self, i: int) -> str:
        if self.lines is not None and 0 <= i < len(self.lines):
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source} row {i + 1}"

    def __getitem__(self, key):  # type: ignore[override]
        got = super().__getitem__(key)
        if isinstance(key, slice):
            return Rows(got, self.source, self.lines[key] if self.lines is not None else None)
        return got


def row_place(rows: list[Any], i: int) -> str:
    """Where row ``i`` of ``rows`` came from (see :class:`Rows`)."""
    return rows.where(i) if isinstance(rows, Rows) else f"row {i + 1}"


def read_rows(source: str, *, split: str = "train") -> Rows:
    """Read rows of a local file or a hub dataset into a list of dicts (a :class:`Rows`)."""
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in LOCAL_SUFFIXES:
        return _read_local(path)
    return _read_hub(source, split)


def read_jsonl(path: Path, limit: int | None = None) -> Rows:
    """The rows of a JSON Lines file (only the first ``limit`` when given); a bad line is one error naming it."""
    rows: list[Any] = []
    lines: list[int] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                except RecursionError:
                    raise DataError(f"{path}:{lineno}: nested too deeply to read") from None
                lines.append(lineno)
            if limit is not None and len(rows) >= limit:
                break
    return Rows(rows, str(path), lines)


def _read_local(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a directory: pass a .txt, .jsonl, .json, .parquet or .csv file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            docs = [d.strip() for d in text.split("\n\n")]
            rows = [{"text": d} for d in docs if d]
        elif suffix == ".jsonl":
            rows = read_jsonl(path)
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = next((v for v in data.values() if isinstance(v, list)), None)
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of rows (or an object holding one)")
            rows = data
        elif suffix in (".parquet", ".csv"):
            import datasets

            ds = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
            rows = list(ds)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl, .json, .parquet or .csv")
    except DataError:
        raise
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"could not read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not rows:
        raise DataError(f"{path} is empty: it has no rows")
    rows = rows if isinstance(rows, Rows) else Rows(rows, str(path))
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{rows.where(bad)}: every row must be a JSON object, this one is a {type(rows[bad]).__name__}")
    return rows


def _read_hub(source: str, split: str) -> list[dict[str, Any]]:
    import datasets

    from draftkit.hub import offline_if_unreachable, unreachable_hint

    name, _, config = source.partition(":")
    offline = offline_if_unreachable()  # no network: the local cache or one line at once, not retries
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if offline:
            raise DataError(f"hub dataset {source} (split {split}) is not in the local cache and {unreachable_hint()}: "
                            "download it where there is network, or pass a local .jsonl/.txt file") from None
        raise DataError(
            f"could not load dataset {source!r} (split {split!r}) from the hub: {first[:200]}; "
            "pass a local .jsonl/.txt file instead when offline"
        ) from exc
    rows = Rows(ds, source)
    if not rows:
        raise DataError(f"dataset {source!r} split {split!r} is empty")
    return rows


COLUMNS_FIX = "pass --columns prompt=COL[,COL],response=COL (or messages=COL, or text=COL)"
# For commands without --columns (prune, sparsify, eval): what the file itself must hold.
RENAME_FIX = ("give the file a text column, a messages column, or a prompt/response pair (question/answer, "
              "instruction/output, prompt/completion), or pass a .txt file")


def detect_columns(rows: list[dict[str, Any]], columns: dict[str, str] | None = None, *,
                   fix: str = COLUMNS_FIX) -> dict[str, Any]:
    """Decide how to read prompt/response pairs from rows.

    Returns a mapping with either ``{"messages": col}``, ``{"text": col}`` or
    ``{"prompt": [cols], "response": col}``. ``columns`` overrides with keys ``prompt`` (comma-separated
    for several), ``response``, ``messages`` or ``text``.
    """
    present = set().union(*(r.keys() for r in rows[:100]))
    if columns:
        missing = [c for v in columns.values() for c in v.split(",") if c not in present]
        if missing:
            raise DataError(f"columns {missing} not in the data; columns found: {sorted(present)}")
        if "messages" in columns:
            return {"messages": columns["messages"]}
        if "prompt" in columns and "response" in columns:
            return {"prompt": columns["prompt"].split(","), "response": columns["response"]}
        if "text" in columns:
            return {"text": columns["text"]}
        raise DataError("--columns needs prompt=COL[,COL],response=COL, or messages=COL, or text=COL")
    if "messages" in present:
        return {"messages": "messages"}
    if "conversations" in present:
        return {"messages": "conversations"}
    for prompts, response in KNOWN_SHAPES:
        if prompts[0] in present and response in present:
            return {"prompt": [c for c in prompts if c in present], "response": response}
    if "text" in present:
        return {"text": "text"}
    raise DataError(f"cannot tell which columns hold the text; columns found: {sorted(present)}; {fix}")


# ShareGPT speakers (``from``) and other spellings -> the roles chat templates expect.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}


CHAT_FIX = 'write each turn as {"role": "user", "content": "text"} (or ShareGPT\'s {"from": "human", "value": "text"})'


def normalise_messages(messages: list[dict[str, Any]] | None, where: str = "a chat row") -> list[dict[str, str]]:
    """Chat turns in OpenAI form (``role``/``content``) or ShareGPT form (``from``/``value``) as
    ``[{"role", "content"}]``: ``human`` -> user, ``gpt``/``model`` -> assistant, ``system`` and ``tool``
    kept, a turn without a speaker is the user's; content is text. The one normaliser of chat rows
    (calibration data, distillation rows, spec prompts).

    Raises:
        DataError: (naming ``where``, e.g. ``data.jsonl:7``) the turns are not a list of objects, or a turn's
            content is a list or an object (multimodal parts, a nested message): never trained on as its repr.
    """
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise DataError(f"{where}: the messages are a {type(messages).__name__}, not a list of turns; {CHAT_FIX}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: turn {j} is a {type(m).__name__} ({_short(m)}), not an object with a role "
                            f"and a content; {CHAT_FIX}")
        speaker = str(m.get("role") or m.get("from") or "user").strip().lower()
        content = m.get("content", m.get("value"))
        if isinstance(content, (dict, list)):
            raise DataError(f"{where}: turn {j}'s content is a {type(content).__name__} ({_short(content)}), not text "
                            "(multimodal parts are not supported); give every turn's content as a string")
        out.append({"role": ROLE_ALIASES.get(speaker, speaker), "content": "" if content is None else str(content)})
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def row_messages(row: dict[str, Any], mapping: dict[str, Any], where: str = "a chat row") -> list[dict[str, str]] | None:
    """The row as chat messages (user prompt, assistant response), or None for plain-text rows."""
    if "messages" in mapping:
        return normalise_messages(row[mapping["messages"]], where)
    if "prompt" in mapping:
        prompt = "\n\n".join(str(row[c]) for c in mapping["prompt"] if row.get(c))
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row[mapping["response"]])}]
    return None


def render_chat(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """Render messages with the tokenizer's chat template, or a plain fallback when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    if add_generation_prompt:
        parts.append("Assistant:")
    return "\n\n".join(parts)


def row_text(row: dict[str, Any], mapping: dict[str, Any], tokenizer, where: str = "a row", cap=None) -> str:
    """The row as one text (chat rows through the template); with ``cap`` (a TextCap), cut as text first."""
    msgs = row_messages(row, mapping, where)
    if msgs is None:
        text = str(row[mapping["text"]])
        return cap(text) if cap is not None else text
    return render_chat(tokenizer, cap.messages(msgs) if cap is not None else msgs)


def model_max_length(model) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None)


def calibration_samples(tokenizer, cfg: CalibConfig, *, max_len: int | None = None) -> list[torch.Tensor]:
    """Tokenized calibration sequences (1-D LongTensors), each at most ``seqlen`` tokens.

    Rows are taken in a seeded random order. Chat rows (prompt/response or ``messages``) are rendered
    through the chat template and packed with EOS between them; plain text (a ``.txt`` file's paragraphs or a
    ``text`` column) is joined as text, with the blank line that separates its paragraphs and no EOS, so the
    windows read like the text itself (an EOS inside running text costs SparseGPT quality: see
    ``benchmarks/sparsify_vs_llmcompressor.py``). The stream is cut into ``samples`` windows of ``seqlen``
    tokens; when the data holds fewer tokens than that, the windows are as many as it fills (the last may be
    shorter).

    Raises:
        DataError: the source is missing, empty or yields no tokens.
    """
    source = cfg.path or DEFAULT_CALIB
    rows = read_rows(source, split=cfg.split)
    mapping = detect_columns(rows, fix=RENAME_FIX)
    rng = random.Random(cfg.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    seqlen = min(cfg.seqlen, max_len) if max_len else cfg.seqlen
    need = cfg.samples * seqlen
    stream: list[int] = []
    plain = "text" in mapping
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and not plain else []
    cap = TextCap(tokenizer, need, source)  # a row longer than all the windows together is cut as text
    for i in order:
        text = row_text(rows[i], mapping, tokenizer, row_place(rows, i), cap).strip()
        if not text:
            continue
        if plain:  # running text: special tokens only where the text starts, paragraphs kept apart by a blank line
            ids = tokenizer(text + "\n\n", add_special_tokens=not stream)["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        stream.extend(ids + sep)
        if len(stream) >= need:
            break
    cap.report()
    if len(stream) < 2:
        raise DataError(f"calibration data {source} yields no tokens")
    samples = [torch.tensor(stream[s : s + seqlen], dtype=torch.long) for s in range(0, len(stream), seqlen)]
    samples = [s for s in samples if len(s) >= 2][: cfg.samples]
    return samples
