"""Draft proposers for speculative decoding, with their own KV caches.

:class:`SameVocabProposer` reads and writes target token ids; :class:`TextProposer` (Universal Assisted
Generation) sees the committed text re-tokenized with the draft's tokenizer and turns its proposal back into
target tokens through text. Only decode forwards are timed (the prompt prefill is not), so the draft's time
per forward compares like with like against the target's one-token forwards.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt (no second BOS when the template already wrote one)."""
    bos = tokenizer.bos_token
    add = not (bos and text.startswith(bos)) and not getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=add)["input_ids"]


class Timer:
    """Seconds of each timed forward."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def mean_ms(self) -> float | None:
        return 1000 * statistics.fmean(self.times) if self.times else None

    def median_ms(self) -> float | None:
        return 1000 * statistics.median(self.times) if self.times else None


@torch.no_grad()
def forward(model: nn.Module, ids: list[int], cache, timer: Timer | None = None) -> torch.Tensor:
    """Logits (float32) of ``ids`` appended to ``cache``; the forward is timed when ``timer`` is given."""
    device = next(model.parameters()).device
    if timer is not None:
        _synchronize(device)
    t0 = time.perf_counter()
    out = model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True)
    logits = out.logits[0].float()
    if timer is not None:
        _synchronize(device)  # CUDA runs the kernels asynchronously: the clock must wait for them, not their launch
        timer.times.append(time.perf_counter() - t0)
    return logits


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_cache(model: nn.Module):
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    if hasattr(cache, "activate_past_recording"):  # sliding-window layers keep what a rollback needs
        cache.activate_past_recording()
    return cache


def crop(cache, keep: int) -> None:
    """Keep the first ``keep`` positions (transformers 5: ``crop(-n)`` removes the last ``n``)."""
    remove = cache.get_seq_length() - keep
    if remove < 0:
        raise RuntimeError(f"cannot crop a cache of {cache.get_seq_length()} positions to {keep}")
    cache.crop(-remove)


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """Greedy (``temperature`` 0: argmax, no distribution) or a draw from ``softmax(logits / T)``."""
    if temperature <= 0:
        return int(logits.argmax()), None
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)), probs


class SameVocabProposer:
    """The draft reads and writes target token ids directly; its cache holds a prefix of them.

    With ``temperature > 0`` each proposal is sampled and its distribution is kept in :attr:`probs`
    (the ``q`` of speculative sampling).
    """

    mode = "same"

    def __init__(self, draft: nn.Module, timer: Timer, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        self.draft, self.timer = draft, timer
        self.temperature, self.generator = temperature, generator
        self.cache = new_cache(draft)
        self.cached: list[int] = []
        self.probs: list[torch.Tensor] = []
        self.forwards = 0

    def prefill(self, seq: list[int]) -> None:
        """The prompt minus its last token into the cache (not timed: the target's prefill is not either)."""
        if len(seq) > 1:
            forward(self.draft, seq[:-1], self.cache)
            self.cached = list(seq[:-1])

    def propose(self, seq: list[int], n: int, stop=None) -> list[int]:
        """Up to ``n`` proposals; ``stop(logits)`` (a dynamic-length policy) may end them after any token."""
        self._sync(seq)
        out: list[int] = []
        self.probs = []
        feed = seq[len(self.cached):]
        for _ in range(n):
            logits = forward(self.draft, feed, self.cache, self.timer)
            self.forwards += 1
            self.cached += feed
            tok, probs = sample(logits[-1], self.temperature, self.generator)
            out.append(tok)
            if probs is not None:
                self.probs.append(probs)
            if stop is not None and len(out) < n and stop(logits[-1]):
                break
            feed = [tok]
        return out

    def _sync(self, seq: list[int]) -> None:
        # Keep the longest cached prefix that agrees with the committed sequence (always >= 1 to feed).
        keep = 0
        limit = min(len(self.cached), len(seq) - 1)
        while keep < limit and self.cached[keep] == seq[keep]:
            keep += 1
        if keep < len(self.cached):
            crop(self.cache, keep)
            self.cached = self.cached[:keep]


class TextProposer(SameVocabProposer):
    """Universal Assisted Generation: the draft sees the committed text in its own tokens; its proposal
    goes back to target tokens through text (greedy only: its probabilities are over another vocabulary)."""

    mode = "text"

    def __init__(self, draft: nn.Module, timer: Timer, draft_tok, target_tok, prompt_text: str, prompt_len: int):
        super().__init__(draft, timer)
        self.draft_tok, self.target_tok = draft_tok, target_tok
        self.prompt_len = prompt_len
        self.draft_prompt = encode_prompt(draft_tok, prompt_text)

    def _draft_ids(self, seq: list[int]) -> list[int]:
        text = self.target_tok.decode(seq[self.prompt_len:], skip_special_tokens=False)
        return self.draft_prompt + (self.draft_tok(text, add_special_tokens=False)["input_ids"] if text else [])

    def prefill(self, seq: list[int]) -> None:
        super().prefill(self._draft_ids(seq))

    def propose(self, seq: list[int], n: int, stop=None) -> list[int]:
        draft_ids = super().propose(self._draft_ids(seq), n, stop)
        gen = seq[self.prompt_len:]
        gen_text = self.target_tok.decode(gen, skip_special_tokens=False)
        proposal = self.draft_tok.decode(draft_ids, skip_special_tokens=False)
        ids = self.target_tok(gen_text + proposal, add_special_tokens=False)["input_ids"]
        if ids[: len(gen)] == gen:
            cand = ids[len(gen):]
        else:  # the boundary re-tokenized differently: fall back to the proposal alone
            cand = self.target_tok(proposal, add_special_tokens=False)["input_ids"]
        return cand[:n]
