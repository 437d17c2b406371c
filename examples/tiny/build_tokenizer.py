#!/usr/bin/env python
"""Build the demo teacher's tokenizer (byte-level BPE, one token per digit).

* Byte-level BPE: every byte has a token, so any text is representable and
  there is no UNK token.
* Digits are always split into single-digit tokens (``Digits(individual_digits=True)``
  before ``ByteLevel``), which makes arithmetic much easier to learn.
* Special tokens: ``<s>`` (bos), ``</s>`` (eos), ``<pad>`` (pad) and the chat
  role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``.
* ``tokenizer(text)`` prepends ``<s>`` like Llama tokenizers do; the chat
  template also starts with ``<s>`` (``apply_chat_template`` tokenizes with
  ``add_special_tokens=False``, so there is exactly one).

Usage::

    python examples/tiny/build_tokenizer.py --data examples/tiny/data --out examples/tiny/teacher
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS] + ROLE_TOKENS  # ids 0..5 in this order

# Each turn: "<|role|>\n{content}</s>\n". The generation prompt is
# "<|assistant|>\n", and the assistant turn ends with eos so generation stops.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Only system, user and assistant roles are supported') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _texts(data_dir: str) -> Iterator[str]:
    with open(os.path.join(data_dir, "train.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield row["question"]
            yield row["answer"]


def build_tokenizer(data_dir: str, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())  # no unk_token: byte-level covers everything
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(data_dir), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=512,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def check_tokenizer(tok) -> None:
    """Round-trip and chat-template sanity checks (raises AssertionError)."""
    samples = [
        "Tom has 12 apples. He buys 7 more apples.\n#### 19",
        "A line\nanother line\n\n  indented\ttab #### 1,234.5",
        "Unseen words: Übergrößenträger, naïve café, 日本語, emoji 🚀, `code()` {x: [1, 2]}",
        "",
        " leading and trailing spaces  ",
    ]
    for s in samples:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s, (s, tok.decode(ids))
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
    digits = tok.tokenize("12345")
    assert len(digits) == 5, digits
    msgs = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<s><|system|>\nYou are helpful.</s>\n<|user|>\nWhat is 2 + 3?</s>\n"
                    "<|assistant|>\n"), repr(text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == text
    for t in ROLE_TOKENS + [BOS, EOS, PAD]:
        assert len(tok.tokenize(t)) == 1, t


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description="Build the tiny demo tokenizer.")
    p.add_argument("--data", default=os.path.join(here, "data"))
    p.add_argument("--out", default=os.path.join(here, "teacher"))
    p.add_argument("--vocab-size", type=int, default=1024)
    args = p.parse_args()
    tok = build_tokenizer(args.data, args.vocab_size)
    check_tokenizer(tok)
    tok.save_pretrained(args.out)
    print(f"saved tokenizer (vocab {len(tok)}) to {args.out}")


if __name__ == "__main__":
    main()
