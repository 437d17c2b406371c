"""Every model input draftkit reads, and the checkpoints it writes.

Inputs (names resolved by :func:`draftkit.refs.resolve_model_ref`):

* a Hugging Face directory: ``config.json`` with one ``model.safetensors`` or shards listed by
  ``model.safetensors.index.json`` (``pytorch_model.bin`` too, which transformers reads ``weights_only``);
* a hub id or an alias (``draftkit models``), fetched into the hub cache;
* a ``.gguf`` file: transformers' GGUF loader dequantizes it into an ordinary model and tokenizer (with
  its chat template); saved, it is ordinary safetensors. Needs ``gguf`` (``pip install 'draftkit[gguf]'``);
* draftkit's sparse-bitmask export (:mod:`draftkit.bitmask`), decompressed in memory.

:func:`load_model` loads any of them whole; :func:`open_checkpoint` / :class:`LazyCheckpoint` read a
safetensors checkpoint lazily, tensor by tensor (layer streaming), with :func:`empty_model` as the
weightless skeleton; :func:`write_safetensors` and :func:`save_model` write.

Submodules: ``files`` (which files a checkpoint has, lazy reading, configs, error translation), ``load``
(whole models, devices, dtypes), ``write`` (shards, saving). Import from ``draftkit.checkpoint``.
A checkpoint that cannot load is one :class:`~draftkit.errors.ModelLoadError` line naming the file
or tensor at fault, never transformers' report.
"""

from draftkit.checkpoint.files import (
    SAFE_INDEX,
    SAFE_WEIGHTS,
    LazyCheckpoint,
    first_line,
    hub_snapshot,
    is_quantized_too,
    is_sparse_checkpoint,
    load_config,
    open_checkpoint,
    read_stored_tensors,
    sparsity_config_of,
    sync_progress_bars,
    translate_load_error,
    weight_files,
)
from draftkit.checkpoint.load import (
    DEVICE_NAMES,
    DType,
    check_device,
    check_tensor_shapes,
    empty_model,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_device,
    torch_dtype,
)
from draftkit.checkpoint.write import (
    check_finite,
    nbytes,
    parse_size,
    save_model,
    write_model,
    write_safetensors,
)
from draftkit.refs import ALIASES, ModelRef, resolve_model_ref

__all__ = [
    "ALIASES", "DEVICE_NAMES", "SAFE_INDEX", "SAFE_WEIGHTS", "LazyCheckpoint", "DType", "ModelRef",
    "check_device", "check_tensor_shapes", "first_line", "hub_snapshot", "is_quantized_too",
    "is_sparse_checkpoint", "load_config", "load_model", "load_model_and_tokenizer", "load_tokenizer",
    "nbytes", "open_checkpoint", "parse_size", "read_stored_tensors", "resolve_device", "resolve_model_ref",
    "save_model", "empty_model", "sparsity_config_of", "sync_progress_bars", "torch_dtype",
    "translate_load_error", "weight_files", "write_model", "write_safetensors", "check_finite",
]
