"""Helpers for the export / eval / spec tests: sparse tiny models, a second tokenizer, a reference decoder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


@torch.no_grad()
def sparsify_in_place(model: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured") -> None:
    """Magnitude pruning of every decoder linear: per row (unstructured) or 2 of every 4 (2:4)."""
    from draftkit.sparsify.masks import target_linears

    for lin in target_linears(model).values():
        w = lin.weight
        if pattern == "2:4":
            groups = w.abs().reshape(-1, 4)
            drop = groups.argsort(dim=1)[:, :2]
            mask = torch.ones_like(groups, dtype=torch.bool).scatter_(1, drop, False)
            w.mul_(mask.reshape(w.shape))
        else:
            k = int(round(sparsity * w.shape[1]))
            idx = w.abs().argsort(dim=1)[:, :k]
            w.scatter_(1, idx, 0.0)


def make_sparse_model(src: Path, out: Path, sparsity: float = 0.5, pattern: str = "unstructured") -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    sparsify_in_place(model, sparsity, pattern)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def decode_bitmask_reference(shape, compressed, bitmask, row_offsets) -> torch.Tensor:
    """An independent decoder written from the format description (not from draftkit's code):
    bit ``c % 8`` (least significant first) of byte ``c // 8`` of row ``r`` says whether column ``c`` is
    non-zero; the non-zeros of row ``r`` are ``compressed[row_offsets[r]:]`` in column order."""
    rows, cols = (int(x) for x in shape.tolist())
    dense = torch.zeros(rows, cols, dtype=compressed.dtype)
    packed = bitmask.tolist()
    for r in range(rows):
        pos = int(row_offsets[r])
        for c in range(cols):
            if (packed[r][c // 8] >> (c % 8)) & 1:
                dense[r, c] = compressed[pos]
                pos += 1
        end = int(row_offsets[r + 1]) if r + 1 < rows else compressed.numel()
        assert pos == end, f"row {r}: {pos - int(row_offsets[r])} bits set but {end - int(row_offsets[r])} values"
    return dense


def build_other_tokenizer(out: Path):
    """A second byte-level BPE (different vocabulary) sharing the chat template, for cross-tokenizer tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import CHAT_TEMPLATE, make_rows

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["question"] + "\n" + r["answer"] for r in make_rows(200, seed=7)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def single_thread():
    """Tiny models run faster on one thread, above all on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
