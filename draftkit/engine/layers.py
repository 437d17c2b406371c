"""Where a layer-wise stage (prune scoring, sparsify, streamed perplexity) gets its decoder layers from.
(Moved here from ``draftkit/layerwise.py``.)

* :class:`ResidentLayers`: the whole model is in memory (small models: fastest, nothing to reload).
* :class:`StreamedLayers`: the model is a skeleton on the meta device; the embeddings and each
  decoder layer are read from the safetensors shards when needed, moved to the compute device, used,
  optionally written to the output shards, and freed. Host and device memory stay at about one
  layer plus the calibration activations, whatever the depth.

Both give the drivers the same modules, so the streamed and resident results are the same computation.
Both run each module in the compute dtype of the running stage (:mod:`draftkit.compute`): ``load`` casts a
layer's weights and keeps its masters (``masters``), ``done`` puts the masters back before the layer is
written or kept, so the output has the stored dtype and weights no stage edited are bit for bit the input's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from draftkit.checkpoint import LazyCheckpoint, check_tensor_shapes, empty_model
from draftkit.checkpoint.stream import (
    ShardWriter,
    free_module,
    layer_key_pattern,
    load_module,
    parameter_keys,
)
from draftkit.compute import Masters, current_dtype
from draftkit.memory import chosen_activation_store, release_freed_memory
from draftkit.modeling import _find_layer_list, decoder, decoder_layers, final_norm
from draftkit.moe.stream import converted_checkpoint, disk_entries

SHARD_BYTES = 2 * 2**30  # the largest output shard a streamed stage writes


def layer_list_prefix(model: nn.Module) -> str:
    """The module name of the decoder layer list (``model.layers`` for Llama)."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise AssertionError("decoder layers not found by name")


class ResidentLayers:
    """The model's own layers, already on the compute device."""

    streamed = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = decoder_layers(model)
        self.device = next(model.parameters()).device
        self.masters = Masters(current_dtype())
        # where activations wait between layers: the estimate's choice, as for StreamedLayers (None: where made)
        self.store: torch.device | None = chosen_activation_store()

    def load_outside(self) -> None:
        pass

    def free_outside(self) -> None:
        pass

    def load(self, i: int) -> nn.Module:
        return self.masters.cast(self.layers[i])

    def done(self, i: int) -> None:
        self.masters.restore(self.layers[i])
        release_freed_memory()  # the previous layer's activations: see StreamedLayers.done

    def load_head(self) -> tuple[nn.Module, nn.Module]:
        head = (final_norm(self.model), self.model.get_output_embeddings())
        for m in head:
            self.masters.cast(m)
        return head

    def free_head(self) -> None:
        for m in (final_norm(self.model), self.model.get_output_embeddings()):
            self.masters.restore(m)


class StreamedLayers:
    """The layers of a safetensors checkpoint, one at a time.

    Args:
        location: local checkpoint directory.
        config: its (already checked) config.
        device: compute device; dtype: the weights' dtype (None keeps the checkpoint's).
        writer: when given, each finished layer is written to it (its keys renamed by ``rename``).
    """

    streamed = True
    store: torch.device | None = None  # set from the memory estimate: the device, or the CPU when they do not fit

    def __init__(self, location: str | os.PathLike, config, *, device: torch.device, dtype: torch.dtype | None = None,
                 trust_remote_code: bool = False):
        self.ckpt = LazyCheckpoint(location, trust_remote_code=trust_remote_code)
        self.model = empty_model(config, trust_remote_code=trust_remote_code, name=str(location))
        self.model.tie_weights()  # a tied head is the embeddings' Parameter, read under the embeddings' key
        self.layers = decoder_layers(self.model)  # unsupported architectures fail here, with their own message
        self.prefix = layer_list_prefix(self.model)
        check_tensor_shapes(self.ckpt.files, config, trust_remote_code=trust_remote_code)
        # the checkpoint under the model's names: an MoE's fused experts built from per-expert tensors (draftkit.moe)
        self.reader = converted_checkpoint(self.ckpt, self.model)
        self.keys = parameter_keys(self.model, self.reader)
        self.device = device
        self.dtype = dtype
        self.masters = Masters(current_dtype())
        self.writer: ShardWriter | None = None
        self.rename: dict[int, int] = {}
        for module in self.model.modules():  # rotary frequencies and other real buffers
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.device.type != "meta":
                    module._buffers[name] = buf.to(device)
        dec = decoder(self.model)
        found = _find_layer_list(dec, self.model)
        assert found is not None
        self._outside = [(n, m) for n, m in dec.named_children() if n != found[0]]
        self._dec_prefix = next(n for n, m in self.model.named_modules() if m is dec)

    # -------------------------------------------------------------- modules around the layers
    def load_outside(self) -> None:
        """Embeddings (and the final norm) of the decoder, for capturing the first layer's inputs."""
        for name, module in self._outside:
            if any(True for _ in module.parameters()):
                load_module(module, f"{self._dec_prefix}.{name}", self.keys, self.reader, device=self.device, dtype=self.dtype)

    def free_outside(self) -> None:
        for _, module in self._outside:
            free_module(module)

    # -------------------------------------------------------------- decoder layers
    def load(self, i: int) -> nn.Module:
        layer = self.layers[i]
        load_module(layer, f"{self.prefix}.{i}", self.keys, self.reader, device=self.device, dtype=self.dtype)
        return self.masters.cast(layer)

    def done(self, i: int) -> None:
        """Write layer ``i`` to the output (when there is one) and free it."""
        layer = self.layers[i]
        self.masters.restore(layer)
        if self.writer is not None and i in self.rename:
            params = self._stored_names({f"{self.prefix}.{i}.{n}": p for n, p in layer.named_parameters()})
            extra = [k for k in self._unread(i) if k not in params]
            tensors: dict[str, Any] = {**params, **self.ckpt.read(extra)}
            self.writer.write({self.renamed(k): t for k, t in tensors.items()})
        free_module(layer)
        # glibc keeps the freed pages of the previous layer's activations (and weights) in its heap, in holes
        # the next layer's differently sized tensors do not fill: without this RSS grows by about one layer's
        # activations per layer
        release_freed_memory()

    def _stored_names(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """Model-named tensors under the names they are stored as (MoE: per-expert, as save_pretrained writes)."""
        return tensors if self.reader is self.ckpt else self.reader.to_disk(tensors)

    def _unread(self, i: int) -> list[str]:
        """Stored keys of layer ``i`` that no parameter is read from (buffers), written back as they are."""
        pattern, taken = layer_key_pattern(self.prefix), getattr(self.reader, "consumed", set())
        return [k for k in self.ckpt.keys() if (m := pattern.match(k)) and int(m.group(1)) == i and k not in taken]

    def renamed(self, key: str) -> str:
        """A decoder layer's key under the layer's number in the output (:meth:`output_tensors`)."""
        m = layer_key_pattern(self.prefix).match(key)
        if m is None:
            return key
        return f"{self.prefix}.{self.rename[int(m.group(1))]}.{m.group(2)}"

    def layer_keys(self) -> dict[int, list[str]]:
        """The checkpoint's keys of each decoder layer, by layer number."""
        pattern = layer_key_pattern(self.prefix)
        out: dict[int, list[str]] = {}
        for k in sorted(self.ckpt.keys()):
            m = pattern.match(k)
            if m:
                out.setdefault(int(m.group(1)), []).append(k)
        return out

    # -------------------------------------------------------------- after the layers
    def load_head(self) -> tuple[nn.Module, nn.Module]:
        """The final norm and the output projection (``lm_head``; for a tied head, the embeddings' tensor)."""
        modules = (final_norm(self.model), self.model.get_output_embeddings())
        names = {id(m): n for n, m in self.model.named_modules()}
        for m in modules:
            load_module(m, names[id(m)], self.keys, self.reader, device=self.device, dtype=self.dtype)
            self.masters.cast(m)
        return modules

    def free_head(self) -> None:
        for m in (final_norm(self.model), self.model.get_output_embeddings()):
            self.masters.restore(m)
            free_module(m)

    # -------------------------------------------------------------- output
    def output_tensors(self, keep: list[int]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The output tensors in production order: the kept layers renumbered, then everything else."""
        self.rename = {old: new for new, old in enumerate(keep)}
        pattern = layer_key_pattern(self.prefix)
        by_layer: dict[int, list[str]] = {}
        rest = []
        for k in sorted(self.ckpt.keys()):
            m = pattern.match(k)
            if m is None:
                rest.append(k)
            else:
                by_layer.setdefault(int(m.group(1)), []).append(k)
        tensors = []
        for old in keep:
            if self.reader is not self.ckpt:  # MoE: the layer as it is now (experts removed) in its stored layout
                params = {f"{self.prefix}.{old}.{n}": p for n, p in self.layers[old].named_parameters()}
                tensors += [(self.renamed(k), s, d) for k, s, d in disk_entries(self.reader, params, self._out_dtype)]
                by_layer[old] = self._unread(old)
            shapes = {f"{self.prefix}.{old}.{n}": tuple(p.shape) for n, p in self.layers[old].named_parameters()}
            for k in by_layer.get(old, []):  # a parameter's shape as it is now (MoE: experts removed)
                tensors.append((self.renamed(k), shapes.get(k, self.ckpt.shape[k]), self._out_dtype(k)))
        tensors += [(k, self.ckpt.shape[k], self._out_dtype(k)) for k in rest]
        return tensors

    def _out_dtype(self, key: str) -> torch.dtype:
        dt = self.ckpt.dtype[key] if key in self.ckpt.dtype else self.reader.dtype[key]
        return self.dtype if self.dtype is not None and dt.is_floating_point else dt

    def open_writer(self, out_dir: Path, keep: list[int], max_shard_bytes: int | None = None) -> ShardWriter:
        """Write the kept layers (renumbered) and then the rest to ``out_dir``, in shards of
        ``max_shard_bytes`` (default :data:`SHARD_BYTES`)."""
        self.writer = ShardWriter(out_dir, self.output_tensors(keep), max_shard_bytes or SHARD_BYTES)
        return self.writer

    def write_rest(self) -> None:
        """Copy every tensor outside the decoder layers (embeddings, final norm, head), one at a time."""
        assert self.writer is not None
        pattern = layer_key_pattern(self.prefix)
        for k in sorted(self.ckpt.keys()):
            if pattern.match(k) is None:
                self.copy(k, k)
        self.writer.close()

    def copy(self, key: str, new_key: str) -> None:
        """Tensor ``key`` of the checkpoint written as ``new_key``: its bytes copied when stored as is,
        read and converted otherwise (another dtype, or a sparse-bitmask group)."""
        assert self.writer is not None
        file = self.ckpt.file_of[key]
        if key in getattr(self.ckpt, "_stored", {key: file}) and self._out_dtype(key) == self.ckpt.dtype[key]:
            self.writer.copy(new_key, file, key)
        else:
            self.writer.write({new_key: self.ckpt.get(key, dtype=self.dtype)})
