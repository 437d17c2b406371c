"""The one perplexity of draftkit: every benchmark and ``draftkit eval --ppl`` call :func:`perplexity`
(or, layer-streamed from a checkpoint's shards, :func:`draftkit.evaluate.streamed.layerwise_perplexity`).

What is scored depends on the rows:

* **chat / instruction rows** (``messages``, or prompt and response columns such as question/answer):
  each row is rendered through the model's chat template and only the **response tokens** are scored
  (the prompt is context, as in training: a model trained on answers is not asked to predict questions);
* **plain text** (a ``.txt`` file, or a ``text`` column): the whole text as one stream, every token scored
  once, with sliding windows of ``seqlen`` tokens advancing by ``stride`` (the transformers recipe).

Which tokens are scored is decided once, by :func:`perplexity_batches`, as ``labels`` (-100 where a position is
context only); both the resident and the streamed path then score the decoder's last hidden states with
:func:`scored_nll`, whose logits exist only for the scored positions, one chunk at a time.

Perplexity is ``exp(total NLL / scored tokens)``; the report says which tokens were scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from draftkit import console
from draftkit.data import RENAME_FIX, detect_columns, read_rows, row_messages, row_place
from draftkit.errors import DataError
from draftkit.memory import heavy_work_starts
from draftkit.modeling import text_config

IGNORE = -100  # draftkit.distill.loss.IGNORE: the label of positions that are not scored


@dataclass
class PerplexityBatches:
    """The forward batches of a perplexity run and, in their ``labels``, the tokens each one scores.

    Each batch holds ``input_ids`` ``[batch, seq]``, ``labels`` (the token ids, -100 where not scored) and,
    for padded chat rows, ``attention_mask``.
    """

    batches: list[dict[str, torch.Tensor]]
    facts: dict[str, Any] = field(default_factory=dict)  # scored, seqlen, stride / rows

    @property
    def tokens(self) -> int:
        """Scored tokens."""
        return sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in self.batches)

    def result(self, nll: float, counted: int) -> dict[str, Any]:
        return {"perplexity": math.exp(nll / counted), "tokens": counted, **self.facts}


def perplexity(model, tokenizer, source: str | Path | list[dict[str, Any]], *, seqlen: int = 1024,
               stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
               limit: int | None = None) -> dict[str, Any]:
    """Perplexity of ``model`` on a local file or a list of rows (see the module docstring); ``limit``: the
    first rows only (chat rows, or a .txt file's paragraphs).

    Returns ``{"perplexity", "tokens" (scored), "scored": "response" | "all", ...}``.
    """
    prepared = perplexity_batches(model.config, tokenizer, source, seqlen=seqlen, stride=stride, max_tokens=max_tokens,
                           batch_size=batch_size, limit=limit)
    return resident_perplexity(model, prepared)


def perplexity_batches(config, tokenizer, source: str | Path | list[dict[str, Any]], *, seqlen: int = 1024,
                    stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
                    limit: int | None = None) -> PerplexityBatches:
    """Tokenize ``source`` (its first ``limit`` rows) into the batches of a perplexity run; ``config`` (the
    model's) caps ``seqlen``.

    Raises:
        DataError: the file is missing, or it holds nothing to score.
    """
    max_pos = getattr(text_config(config), "max_position_embeddings", None) or seqlen
    seqlen = min(seqlen, max_pos)
    rows, name, plain = _rows(source)
    if limit is not None:
        rows = rows[:limit]
    if not plain:
        mapping = detect_columns(rows, fix=RENAME_FIX)
        if "text" not in mapping:
            return _response_batches(tokenizer, rows, mapping, name, seqlen=seqlen, max_tokens=max_tokens,
                                     batch_size=batch_size)
        text = "\n\n".join(str(r[mapping["text"]]) for r in rows if r.get(mapping["text"]))
    else:
        text = "\n\n".join(r["text"] for r in rows)
    return _text_windows(tokenizer, text, name, seqlen=seqlen, stride=stride, max_tokens=max_tokens)


def _rows(source) -> tuple[list[dict[str, Any]], str, bool]:
    if isinstance(source, list):
        if not source:
            raise DataError("no rows to measure perplexity on")
        return source, "rows", False
    path = Path(source)
    if not path.is_file():
        raise DataError(f"perplexity file {path} does not exist")
    return read_rows(str(path)), str(path), path.suffix.lower() == ".txt"


def response_labels(tokenizer, messages: list[dict[str, str]], max_length: int, cap=None) -> dict[str, list[int]]:
    """Token ids of a conversation and labels that are -100 everywhere but the last (assistant) turn."""
    from draftkit.distill.loss import tokenize_example

    return tokenize_example(tokenizer, messages[:-1], messages[-1]["content"], max_length, cap)


def _response_batches(tokenizer, rows, mapping, name: str, *, seqlen: int, max_tokens: int | None,
                      batch_size: int) -> PerplexityBatches:
    """Chat rows: one conversation per sequence, right-padded (so positions, and RoPE, are those of an
    unpadded row), the response tokens scored."""
    from draftkit.textcap import TextCap

    encoded = []
    cap = TextCap(tokenizer, seqlen, name)
    for i, r in enumerate(rows):
        msgs = row_messages(r, mapping, row_place(rows, i))
        if not msgs or msgs[-1]["role"] != "assistant" or not str(msgs[-1]["content"]).strip():
            continue
        enc = response_labels(tokenizer, msgs, seqlen, cap)
        if any(t != IGNORE for t in enc["labels"][1:]):
            encoded.append(enc)
    cap.report()
    if not encoded:
        raise DataError(f"{name}: no row has a response to score")
    from draftkit.distill.loss import collate

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches, counted = [], 0
    for s in range(0, len(encoded), batch_size):
        batch = collate(encoded[s: s + batch_size], pad)
        batches.append(batch)
        counted += int((batch["labels"][:, 1:] != IGNORE).sum())
        if max_tokens and counted >= max_tokens:
            break
    return PerplexityBatches(batches, {"rows": len(encoded), "scored": "response", "seqlen": seqlen})


def _text_windows(tokenizer, text: str, name: str, *, seqlen: int, stride: int | None,
                  max_tokens: int | None) -> PerplexityBatches:
    """Plain text: windows of ``seqlen`` tokens every ``stride``; each scores only the tokens it adds
    (positions at or after the previous window's end), never position 0 of the stream."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    if max_tokens:  # text beyond what max_tokens tokens can hold is never scored: cut it (silently: asked for)
        from draftkit.textcap import TextCap

        text = TextCap(tokenizer, max_tokens, name)(text)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=add_special)["input_ids"][0]
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise DataError(f"{name} yields fewer than 2 tokens: nothing to score")
    stride = min(stride or max(seqlen // 2, 1), seqlen)
    batches = []
    prev_end = 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + seqlen, len(ids))
        window = ids[begin:end].unsqueeze(0)
        labels = window.clone()
        labels[0, : max(prev_end, begin + 1) - begin] = IGNORE
        batches.append({"input_ids": window, "labels": labels})
        prev_end = end
        if end == len(ids):
            break
    return PerplexityBatches(batches, {"seqlen": seqlen, "stride": stride, "scored": "all"})


def scored_nll(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, transform=None) -> tuple[float, int]:
    """Summed NLL of ``labels[:, t + 1]`` under ``head(hidden[:, t])`` over the scored positions, and their count.

    ``hidden`` is the decoder's output after its final norm; float32 logits exist for one chunk of scored
    positions at a time (:func:`~draftkit.distill.loss.chunked_cross_entropy`).
    """
    from draftkit.distill.loss import chunked_cross_entropy

    labels = labels.to(hidden.device)
    n = int((labels[:, 1:] != IGNORE).sum())
    if not n:
        return 0.0, 0
    return float(chunked_cross_entropy(hidden, labels, head, transform=transform, reduction="sum")), n


@torch.no_grad()
def resident_perplexity(model, prepared: PerplexityBatches) -> dict[str, Any]:
    """Perplexity of an in-memory ``model`` on batches :func:`perplexity_batches` already made."""
    from draftkit.distill.loss import _causal_lm, _logit_transform

    lm = _causal_lm(model)
    get_decoder = getattr(lm, "get_decoder", None)
    dec = get_decoder() if callable(get_decoder) else None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    device = next(model.parameters()).device
    transform = _logit_transform(lm.config)
    heavy_work_starts()
    nll, counted = 0.0, 0
    for batch in console.track(prepared.batches, "perplexity"):
        kw = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
        if dec is None or head is None or dec is lm:  # no separable decoder and head: score the model's logits
            hidden, proj, fn = model(**kw, use_cache=False).logits, nn.Identity(), None
        else:
            hidden, proj, fn = dec(**kw, use_cache=False).last_hidden_state, head, transform
        part, n = scored_nll(hidden, batch["labels"], proj, fn)
        nll += part
        counted += n
    return prepared.result(nll, counted)
