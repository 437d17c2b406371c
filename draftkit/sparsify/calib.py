"""Calibration tokens for the sparsify stage: equal-length sequences batched into chunks whose layer
forward fits in memory; and the settings check that runs before any weights load."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from draftkit.data import calibration_samples, model_max_length
from draftkit.errors import DataError, InvalidInputError
from draftkit.modeling import text_config
from draftkit.sparsify.config import SparsifyConfig

# Tokens per chunk by default: enough rows for full-speed matrix products, few enough that one chunk's transient
# activations are small beside the calibration states every chunk keeps (README, "Sparsify: draftkit against
# llm-compressor"). Each chunk's forward runs once whatever the count (draftkit.sparsify.interleaved).
DEFAULT_CHUNK_TOKENS = 4096


def _auto_chunk_tokens(model: nn.Module, seqlen: int, device: torch.device | None = None) -> int:
    """Tokens per forward: :data:`DEFAULT_CHUNK_TOKENS` (at least one sequence), fewer when one layer's activations
    for them would not stay within a quarter of the memory they run in: the free memory of the GPU
    (``torch.cuda.mem_get_info``) when ``device`` is CUDA, else the machine's RAM."""
    cfg = text_config(model)
    hidden = getattr(cfg, "hidden_size", 4096)
    inter = getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", 32)
    # ~10 hidden-wide and 3 intermediate-wide float32 tensors per token, plus eager attention scores.
    per_token = 4 * (10 * hidden + 3 * inter + 2 * heads * seqlen)
    if device is not None and torch.device(device).type == "cuda":
        total = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 16 * 2**30
    return max(seqlen, min(DEFAULT_CHUNK_TOKENS, int(total * 0.25 / per_token)))


def _chunks(samples: list[torch.Tensor], chunk_tokens: int) -> list[torch.Tensor]:
    seqlen = len(samples[0])
    per = max(1, chunk_tokens // seqlen)
    return [torch.stack(samples[i : i + per]) for i in range(0, len(samples), per)]


def calibration_chunks(model, tokenizer, cfg: SparsifyConfig, device: torch.device | None = None,
                       ) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Equal-length calibration sequences, batched into chunks of at most ``chunk_tokens`` tokens.

    Raises:
        DataError: the data does not fill one sequence of ``seqlen`` tokens.
    """
    max_len = model_max_length(model)
    seqlen = min(cfg.calib.seqlen, max_len) if max_len else cfg.calib.seqlen
    samples = calibration_samples(tokenizer, cfg.calib, max_len=max_len)
    full = [s for s in samples if len(s) == seqlen]
    if not full:
        have = sum(len(s) for s in samples)
        raise DataError(
            f"calibration data {cfg.calib.path or 'default'} holds {have} tokens, fewer than one sequence of "
            f"{seqlen}: give more data or a smaller --seqlen"
        )
    chunk_tokens = cfg.chunk_tokens or _auto_chunk_tokens(model, seqlen, device)
    chunks = _chunks(full, chunk_tokens)
    info = {
        "samples": len(full),
        "seqlen": seqlen,
        "tokens": len(full) * seqlen,
        "chunks": len(chunks),
        "dropped_short_samples": len(samples) - len(full),
    }
    return chunks, info


def check_sparsify(hf_config, cfg: SparsifyConfig) -> None:
    """Before the weights load: an N:M pattern whose M does not divide the model's widths fails fast.

    Only the default targets (every decoder linear) are checked here; with ``targets``/``ignore`` the
    check runs on the real modules in :func:`sparsify_model`.
    """
    nm = cfg.nm
    if nm is None or cfg.targets or cfg.ignore:
        return
    tc = text_config(hf_config)
    for key in ("hidden_size", "intermediate_size"):
        width = getattr(tc, key, None)
        if isinstance(width, int) and width % nm[1]:
            raise InvalidInputError(
                f"pattern {cfg.pattern}: M={nm[1]} does not divide the model's {key} ({width}); choose another M"
            )
