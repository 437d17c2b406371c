"""Training examples and the response-only loss.

The loss is the mean next-token cross-entropy over response tokens, computed the way torchtune's
``CEWithChunkedOutputLoss`` does it, one step further: the decoder's last hidden states are gathered at
the response positions only, and the output projection + float32 cross-entropy run on chunks of
``chunk_size`` of them under activation checkpointing. So logits exist for one chunk at a time (in the
forward pass and again in the backward pass), never as a ``batch x sequence x vocabulary`` float32
tensor, and prompt and padding positions cost no output projection at all.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from draftkit.data import render_chat
from draftkit.distill.rows import has_chat_template
from draftkit.errors import InvalidInputError
from draftkit.textcap import TextCap

IGNORE = -100
DEFAULT_CHUNK = 512


def tokenize_example(tokenizer, prompt: list[dict[str, str]], response: str, max_length: int,
                     cap: TextCap | None = None) -> dict[str, list[int]]:
    """``input_ids`` of prompt + response in the chat template, and ``labels`` that are -100 on the prompt.

    The prompt (with the generation prompt, e.g. ``<|assistant|>\\n``) and the rest of the rendered
    conversation (the response and the template's end-of-turn) are tokenized separately, so the boundary is
    exact. Without a chat template the plain ``User:/Assistant:`` form is used and EOS closes the response.
    Texts longer than ``max_length`` tokens can hold are cut as text first (``cap`` counts them for one line).
    """
    cap = cap or TextCap(tokenizer, max_length)
    prompt, response = cap.messages(prompt), cap(response)
    chat = has_chat_template(tokenizer)
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    if chat:
        full = render_chat(tokenizer, [*prompt, {"role": "assistant", "content": response}])
        if not full.startswith(prompt_text):
            raise InvalidInputError("the student's chat template renders the prompt differently with a response; "
                                    "cannot tell prompt tokens from response tokens")
        rest = full[len(prompt_text):]
    else:
        prompt_text += " "
        rest = response
    p_ids = tokenizer(prompt_text, add_special_tokens=not chat)["input_ids"]
    r_ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
    if not chat and tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]
    ids = (p_ids + r_ids)[:max_length]
    labels = ([IGNORE] * len(p_ids) + r_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _logit_transform(config):
    """What the model's forward applies to ``lm_head``'s output (Gemma 2's soft-capping, Granite's and
    Cohere's scaling), so the chunked loss matches the model's own logits."""
    cap = getattr(config, "final_logit_softcapping", None)
    div = getattr(config, "logits_scaling", None)
    mul = getattr(config, "logit_scale", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if mul is not None:
            logits = logits * mul
        if div is not None:
            logits = logits / div
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, *, chunk_size: int = DEFAULT_CHUNK,
                          transform=None, reduction: str = "mean") -> torch.Tensor:
    """Mean (or, with ``reduction="sum"``, summed) cross-entropy of ``head(hidden[t])`` against ``labels[t + 1]`` over positions whose label is not
    -100, in float32, one checkpointed chunk of ``chunk_size`` positions at a time.

    Args:
        hidden: ``(batch, seq, hidden)`` last hidden states.
        labels: ``(batch, seq)`` token ids, -100 where no loss is wanted.
        head: the output projection (``lm_head``).
    """
    sel = labels[:, 1:] != IGNORE
    h = hidden[:, :-1][sel]
    y = labels[:, 1:][sel]
    if y.numel() == 0:
        return hidden.sum() * 0.0

    def ce_sum(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        logits = head(h_chunk).float()
        if transform is not None:
            logits = transform(logits)
        return nn.functional.cross_entropy(logits, y_chunk, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, y.numel(), chunk_size):
        h_chunk, y_chunk = h[s: s + chunk_size], y[s: s + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(ce_sum, h_chunk, y_chunk, use_reentrant=False)
        else:
            total = total + ce_sum(h_chunk, y_chunk)
    return total if reduction == "sum" else total / y.numel()


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a peft wrapper (whose injected LoRA layers it calls)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of the next token over positions whose label is not -100 (chunked; see the module).

    Models without a separable decoder and output projection fall back to their full logits.
    """
    lm = _causal_lm(model)
    get_decoder = getattr(lm, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is lm:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift = logits[:, :-1].float()
        return nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                           ignore_index=IGNORE)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    return chunked_cross_entropy(hidden, batch["labels"], head, chunk_size=chunk_size,
                                 transform=_logit_transform(lm.config))


class LossModule(nn.Module):
    """The causal LM and its response loss as one module, so ``accelerate.prepare`` (DDP, FSDP) wraps the
    whole computation and ``forward`` is the loss."""

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK, loss_fn=None):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # accelerate's FSDP units: decoder layers
        self.chunk_size = chunk_size
        self.loss_fn = loss_fn

    def forward(self, input_ids, attention_mask, labels):
        fn = self.loss_fn or response_loss
        return fn(self.model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
