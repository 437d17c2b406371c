"""``draftkit eval --ppl`` on checkpoints read one decoder layer at a time.

:func:`place_eval` decides, before any weights load and by the rule the prune and sparsify stages follow
(:func:`draftkit.engine.placement.choose_streaming`), whether a perplexity-only evaluation streams, and gives the
memory estimate printed before the forward. :func:`streamed_perplexity` (the eval stage and its baseline)
then runs the perplexity of :mod:`draftkit.evaluate.perplexity` (the same batches, the same scored tokens)
through the layer-wise driver, :func:`layerwise_perplexity`: the model is a skeleton on the meta device;
the embeddings are read to capture every layer's inputs, then each decoder layer is read from the shards,
run over all batches and freed; last, the final norm and the head score each batch's hidden states, with
logits for one chunk of scored positions at a time.

Evaluations with ``--tasks`` (generation, lm-eval) need the whole model and stay resident.
"""

from __future__ import annotations

from typing import Any

import torch

from draftkit.errors import InvalidInputError
from draftkit.evaluate.perplexity import PerplexityBatches, perplexity_batches, scored_nll
from draftkit.memory import (
    MemoryEstimate,
    activation_device,
    announce_before_heavy_work,
    estimate_memory,
)


def place_eval(model_name: str, cfg, load, facts=None) -> tuple[bool, MemoryEstimate | None, PerplexityBatches | None]:
    """Stream or not, the memory estimate and the perplexity batches of an evaluation.

    Raises:
        InvalidInputError: ``--stream on`` with ``--tasks`` (they need the whole model), or the run cannot fit.
        DataError: the ``--ppl`` file holds nothing to score.
    """
    if cfg.tasks or not cfg.ppl:
        if load.stream == "on":
            raise InvalidInputError(
                f"--stream on streams eval --ppl alone, but --tasks {','.join(cfg.tasks)} needs the whole model: "
                "drop --tasks (run them separately) or pass --stream auto"
            )
        return False, None, None
    from draftkit.checkpoint import load_tokenizer
    from draftkit.checkpoint.facts import read_facts
    from draftkit.distill.loss import DEFAULT_CHUNK  # scored positions per output projection
    from draftkit.engine.placement import choose_streaming, compute_bytes, load_dtype_bytes
    from draftkit.modeling import text_config

    facts = facts or read_facts(model_name, device=load.device, trust_remote_code=load.trust_remote_code)
    config, device, can_stream, size = facts.config, facts.device, facts.can_stream, facts.size
    tokenizer = load_tokenizer(model_name, trust_remote_code=load.trust_remote_code)
    prepared = perplexity_batches(config, tokenizer, cfg.ppl, seqlen=cfg.ppl_seqlen, stride=cfg.ppl_stride,
                           batch_size=cfg.batch_size, limit=cfg.limit)
    widest = max(b["input_ids"].numel() for b in prepared.batches)
    total = sum(b["input_ids"].numel() for b in prepared.batches)
    seqlen = max(b["input_ids"].shape[1] for b in prepared.batches)
    vocab = int(getattr(text_config(config), "vocab_size", 32000))
    logits = 2 * min(DEFAULT_CHUNK, widest) * vocab * 4  # float32 logits and their log-softmax, one chunk

    def est(streamed: bool) -> MemoryEstimate:
        # resident: one batch's activations at a time; streamed: every batch's, between two layers
        e = estimate_memory(config, ckpt_bytes=size, streamed=streamed, device=device, tokens=total if streamed else widest,
                            seqlen=seqlen, chunk_tokens=widest, sparsegpt=False,
                            dtype_bytes=load_dtype_bytes(load, config), act_bytes=compute_bytes())
        e.parts["logits"] = logits
        if e.device:
            e.device += logits
        else:
            e.host += logits
        return e

    streamed, estimate = choose_streaming(model_name, load.stream, est, can_stream=can_stream, size=size, device=device)
    return streamed, estimate, prepared


@torch.no_grad()
def layerwise_perplexity(source, prepared: PerplexityBatches) -> dict[str, Any]:
    """The perplexity of ``prepared`` with the decoder layers of ``source`` (:mod:`draftkit.engine.layers`) one at a time.

    Hidden states wait between layers per batch on ``source.store`` (the compute device when the estimate
    says they fit, else the CPU).
    """
    from draftkit.distill.loss import _logit_transform
    from draftkit.engine.forward import through_layers

    batches = prepared.batches
    hidden = through_layers(source, [b["input_ids"] for b in batches], masks=[b.get("attention_mask") for b in batches],
                            desc="perplexity (layer by layer)")
    norm, head = source.load_head()
    transform = _logit_transform(source.model.config)
    nll, counted = 0.0, 0
    for batch in batches:
        h = norm(hidden.pop(0).to(source.device))  # each batch's states freed once scored
        part, n = scored_nll(h, batch["labels"], head, transform)
        nll += part
        counted += n
    source.free_head()
    return prepared.result(nll, counted)


def streamed_perplexity(model_name: str, load, estimate: MemoryEstimate, prepared: PerplexityBatches) -> dict[str, Any]:
    """:func:`layerwise_perplexity` on a local safetensors checkpoint, as ``load`` says (device, dtype)."""
    from draftkit.checkpoint import load_config, resolve_device, resolve_model_ref, torch_dtype
    from draftkit.engine.layers import StreamedLayers

    device = resolve_device(load.device)
    source = StreamedLayers(resolve_model_ref(model_name).location,
                            load_config(model_name, trust_remote_code=load.trust_remote_code), device=device,
                            dtype=None if load.dtype == "auto" else torch_dtype(load.dtype),
                            trust_remote_code=load.trust_remote_code)
    source.store = activation_device(estimate, device)
    announce_before_heavy_work(estimate)
    return layerwise_perplexity(source, prepared)


__all__ = ["layerwise_perplexity", "place_eval", "streamed_perplexity"]
