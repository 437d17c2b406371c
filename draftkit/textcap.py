"""Texts longer than can ever be used are cut as text, before a tokenizer sees them.

A row of a dataset can be any length (one 50 MB line made the Rust tokenizer abort with a 212-line
backtrace after taking 9.5 GB). Whatever reads rows keeps at most ``max_tokens`` tokens of each (training's
``max_length``, the calibration windows' total), and no token of a vocabulary covers more characters than
its own spelling has (a byte-level BPE token spells each byte it covers, a SentencePiece piece each
character, a byte-fallback token ``<0xE2>`` six characters for one byte). So a text of more than
``max_tokens x`` (the longest token's length) characters has more than ``max_tokens`` tokens: what lies
beyond that many characters is never used, and is cut before tokenizing (the tokens kept are the text's
first ones either way, up to how the word at the cut splits). One line says how many texts were cut.
"""

from __future__ import annotations

from typing import Any

from draftkit import console

_longest: dict[int, tuple[Any, int]] = {}


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can cover (the length of its longest spelling)."""
    key = id(tokenizer)
    hit = _longest.get(key)
    if hit is None or hit[0] is not tokenizer:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        longest = max((len(t) for t in vocab), default=0)
        hit = _longest[key] = (tokenizer, max(longest, 16))
    return hit[1]


class TextCap:
    """Cut texts to what ``max_tokens`` tokens of ``tokenizer`` can hold; :meth:`report` says what was cut."""

    def __init__(self, tokenizer, max_tokens: int, what: str = "the data"):
        self.max_tokens = max_tokens
        self.limit = max_tokens * longest_token_chars(tokenizer)
        self.what = what
        self.cut = 0
        self.longest = 0

    def __call__(self, text: str) -> str:
        if len(text) <= self.limit:
            return text
        self.cut += 1
        self.longest = max(self.longest, len(text))
        return text[: self.limit]

    def messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Each turn's content cut (a conversation is used from its start, up to ``max_tokens`` tokens)."""
        if all(len(m["content"]) <= self.limit for m in messages):
            return messages
        return [{**m, "content": self(m["content"])} for m in messages]

    def report(self) -> None:
        """One line when anything was cut (then counts start again)."""
        if self.cut:
            console.warn(f"{self.what}: {self.cut} text(s) longer than {self.max_tokens} tokens can hold (the longest "
                         f"{self.longest:,} characters) cut to their first {self.limit:,} characters before tokenizing")
        self.cut = self.longest = 0
