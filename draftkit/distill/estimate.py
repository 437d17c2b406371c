"""The memory estimate of a training run, printed before the first step (the distill stage and its command).

Arithmetic on the model and the data, nothing measured: the weights as they train (float32 master weights, or
bfloat16 with ``bf16-true``), the trainable weights' gradients and AdamW's two moments, the activations the
backward pass keeps for the longest micro-batch (every layer's, or with activation checkpointing one
hidden-wide value per layer plus one layer's worth), one chunk of the response-only loss's logits, and the
Python process itself.
"""

from __future__ import annotations

from torch import nn

from draftkit.memory import PROCESS_BYTES, MemoryEstimate
from draftkit.modeling import text_config

# values kept for the backward pass per token and decoder layer, in units of the hidden and MLP widths, plus the
# attention probabilities (heads x sequence length per token) that the padded batches' masked attention stores
HIDDEN_VALUES, MLP_VALUES, SCORE_COPIES = 10, 4, 2
LOSS_LOGIT_COPIES = 3  # a chunk's logits, their log-softmax and its gradient, float32


def estimate_training(model: nn.Module, *, tokens: int, seqlen: int, precision: str, checkpointing: bool,
                      optimizer_in_backward: bool, loss_chunk: int) -> MemoryEstimate:
    """Peak memory of training ``model`` on micro-batches of ``tokens`` tokens (``seqlen`` the longest row)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    parts = training_parts(text_config(model), total=total, trainable=trainable, tokens=tokens, seqlen=seqlen,
                           precision=precision, checkpointing=checkpointing,
                           optimizer_in_backward=optimizer_in_backward, loss_chunk=loss_chunk)
    device = next(model.parameters()).device
    peak = sum(parts.values())
    if device.type == "cuda":
        return MemoryEstimate(PROCESS_BYTES, peak, parts, "cuda")
    return MemoryEstimate(PROCESS_BYTES + peak, 0, parts, "cpu")


def training_parts(tc, *, total: int, trainable: int, tokens: int, seqlen: int, precision: str, checkpointing: bool,
                   optimizer_in_backward: bool, loss_chunk: int) -> dict[str, int]:
    """The parts of :func:`estimate_training` for a model of ``total`` parameters (``trainable`` of them trained)."""
    hidden = int(getattr(tc, "hidden_size", 0) or 0)
    inter = int(getattr(tc, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(tc, "num_attention_heads", 0) or 1)
    layers = int(getattr(tc, "num_hidden_layers", 0) or 1)
    vocab = int(getattr(tc, "vocab_size", 0) or 0)
    master = 2 if precision == "bf16-true" else 4
    act = 2 if precision in ("bf16-mixed", "bf16-true") else 4
    per_layer = tokens * (HIDDEN_VALUES * hidden + MLP_VALUES * inter + SCORE_COPIES * heads * seqlen) * act
    return {
        "weights": total * master,
        "gradients": 0 if optimizer_in_backward else trainable * master,
        "optimizer": 2 * trainable * master,
        "activations": (tokens * hidden * act * layers + per_layer) if checkpointing else per_layer * layers,
        "loss": LOSS_LOGIT_COPIES * min(loss_chunk, tokens) * vocab * 4,
    }


def recipe_estimate(hf_config, cfg, load, size: int) -> int:
    """A recipe's estimate of the distill stage (``--dry-run``, preflight), from the configs alone: training at
    full micro-batches of ``max_length`` tokens by :func:`training_parts` (LoRA: the adapters, about 1% of the
    weights, trained), or the student and the teacher side by side while the teacher regenerates, whichever is more."""
    from draftkit.estimates import count_params, model_bytes

    total = count_params(hf_config)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if load.device.startswith("cuda") else "fp32")
    parts = training_parts(text_config(hf_config), total=total, trainable=total // 100 if cfg.lora_rank else total,
                           tokens=cfg.train_batch_size * cfg.max_length, seqlen=cfg.max_length, precision=precision,
                           checkpointing=bool(cfg.gradient_checkpointing),
                           optimizer_in_backward=cfg.optimizer_in_backward, loss_chunk=cfg.loss_chunk_size)
    teacher = model_bytes(cfg.teacher, load) if cfg.regenerate and cfg.teacher and cfg.engine == "hf" else 0
    return PROCESS_BYTES + max(sum(parts.values()), size + teacher)


def batch_shape(train_set: list[dict[str, list[int]]], batch_size: int) -> tuple[int, int]:
    """``(tokens, longest row)`` of the largest micro-batch: ``batch_size`` rows padded to the longest."""
    longest = max((len(e["input_ids"]) for e in train_set), default=1)
    return min(batch_size, max(1, len(train_set))) * longest, longest
