"""The generic layer forward of every layer-wise stage: capture what the decoder layers receive, run one layer.

:func:`capture_layer_inputs` replaces every decoder layer by a stub that records all the positional and keyword
arguments it receives (position embeddings, its own attention mask — sliding-window layers get a different one —,
position ids, cache positions...) and passes the hidden states through; one cheap model forward per chunk of
calibration tokens records the first layer's input and every layer's arguments, without running any layer.
:func:`run_layer` then runs one layer on one chunk with the arguments captured for it. (Moved here from
``draftkit/sparsify/runner.py``; prune scoring, sparsify and the streamed perplexity all use it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from draftkit.compute import to_compute
from draftkit.memory import heavy_work_starts
from draftkit.modeling import decoder, decoder_layers


class Stop(Exception):
    """Raised inside a forward to end it early (capture, or a group's Hessian is complete)."""


@dataclass
class LayerInputs:
    """What the decoder layers receive: hidden states per chunk, and each layer's other arguments per chunk."""

    hidden: list[torch.Tensor]
    args: list[list[tuple[tuple, dict[str, Any]]]]  # [layer][chunk] -> (extra positional args, kwargs)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, chunks: list[torch.Tensor], *, device=None,
                         masks: list[torch.Tensor | None] | None = None, store=None,
                         dtype: torch.dtype | None = None) -> LayerInputs:
    """Record the first layer's hidden states and every layer's other arguments, per chunk of input ids
    (and, for padded chunks, their ``attention_mask`` in ``masks``). The hidden states wait on ``store``
    (a streamed run's activation device, the CPU when they do not fit on the compute device), else where made.
    With ``dtype`` (the compute dtype) the hidden states and the floating arguments (position embeddings,
    additive masks) are recorded in it, as a model stored in that dtype would make them.

    The layers are stubbed out (identity on the hidden states), so this costs an embedding lookup and
    the mask/rotary set-up per chunk, not a forward.
    """
    layers = decoder_layers(model)
    base = decoder(model)
    hidden: list[torch.Tensor] = []
    args: list[list] = [[] for _ in layers]
    originals = []

    def stub(idx):
        def forward(*a, **kw):
            h = a[0] if a else kw.pop("hidden_states")
            rest = a[1:]
            if idx == 0:
                x = to_compute(h.detach(), dtype)
                hidden.append(x if store is None else x.to(store))
            args[idx].append(to_compute((rest, dict(kw)), dtype, memo))
            if idx == len(layers) - 1:
                raise Stop
            return h

        return forward

    for i, layer in enumerate(layers):
        originals.append(layer.__dict__.get("forward"))
        layer.forward = stub(i)
    device = device or next(model.parameters()).device
    heavy_work_starts()
    try:
        for c, ids in enumerate(chunks):
            memo: dict = {}  # one cast per tensor the layers share (position embeddings, masks)
            mask = masks[c] if masks is not None else None
            try:
                base(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device), use_cache=False)
            except Stop:
                pass
    finally:
        for layer, orig in zip(layers, originals, strict=True):
            if orig is None:
                del layer.forward
            else:
                layer.forward = orig
    return LayerInputs(hidden, args)


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple[tuple, dict]) -> torch.Tensor:
    """One decoder layer on one chunk of hidden states, with the arguments captured for it."""
    rest, kw = args
    param = next(layer.parameters(), None)
    if param is not None and hidden.device != param.device:  # activations kept on the CPU between layers
        hidden = hidden.to(param.device)
    return _layer_output(layer(hidden, *rest, **kw))


def one_shot_runs(layer: nn.Module, hidden: list[torch.Tensor | None], args: list[tuple[tuple, dict]]) -> list:
    """One callable per chunk that runs ``layer`` on that chunk once: the chunk's input and arguments are taken out
    of ``hidden`` and ``args`` now and dropped when its forward starts, so each input is freed as soon as the
    forward no longer needs it (a stage that suspends chunk forwards keeps no input alive for them)."""

    def run_of(c: int):
        box = [hidden[c], args[c]]
        hidden[c] = None

        def run() -> torch.Tensor:
            h, a = box
            box.clear()
            return run_layer(layer, h, a)

        return run

    return [run_of(c) for c in range(len(hidden))]


@torch.no_grad()
def through_layers(source, chunks: list[torch.Tensor] | None, *, masks: list[torch.Tensor | None] | None = None,
                   before=None, after=None, forward=None, desc: str | None = "layers") -> list[torch.Tensor]:
    """The sequential pass every layer-wise stage makes: each decoder layer of ``source``
    (:mod:`draftkit.engine.layers`) once, in order, over every chunk of token ids; only one layer is loaded at a
    time, and the hidden states wait on ``source.store`` between layers (the placement the memory estimate chose).
    Each layer is done (written, when the source writes, and freed) before the next loads.

    A stage plugs in per layer, as llm-compressor's modifiers hook a layer in its sequential pipeline:
    ``before(i, layer, run_all, masters)`` may edit layer ``i`` before its outputs are computed (``run_all()``
    runs it over every chunk; ``masters``: its stored-dtype weights), and ``after(i, c, x_in, x_out)`` sees each
    chunk's input and output of the layer (scoring). ``forward(i, layer, runs)`` runs the layer's chunks itself and
    returns their outputs in order: ``runs[c]()`` runs chunk ``c`` through the layer once (:func:`one_shot_runs`;
    sparsify prunes inside those forwards). With ``chunks`` None no calibration forward runs: each layer is loaded,
    handed to ``forward(i, layer, [])`` and done. ``desc``: the progress bar's (None: none, the stage shows its own).
    Returns the last layer's outputs, per chunk.
    """
    from draftkit.console import track

    hidden: list = []
    inputs = None
    if chunks is not None:
        source.load_outside()
        inputs = capture_layer_inputs(source.model, chunks, device=source.device, masks=masks, store=source.store,
                                      dtype=source.masters.dtype)
        source.free_outside()
        hidden = inputs.hidden
    heavy_work_starts()
    n = len(source.layers)
    for i in track(range(n), desc) if desc is not None else range(n):
        layer = source.load(i)
        args = inputs.args[i] if inputs is not None else []
        if before is not None:
            before(i, layer, lambda: [run_layer(layer, hidden[c], args[c]) for c in range(len(hidden))],  # noqa: B023
                   source.masters)
        if forward is not None:
            outs = forward(i, layer, one_shot_runs(layer, hidden, args))
            hidden[:] = outs if source.store is None else [o.to(source.store) for o in outs]
            del outs
        else:
            for c in range(len(hidden)):
                x_out = run_layer(layer, hidden[c], args[c])
                if after is not None:
                    after(i, c, hidden[c], x_out)
                hidden[c] = x_out if source.store is None else x_out.to(source.store)
        if inputs is not None:
            inputs.args[i] = args = []  # free this layer's masks and position embeddings
        source.done(i)  # frees a streamed layer and hands the freed pages back: host memory stays flat with depth
    return hidden
