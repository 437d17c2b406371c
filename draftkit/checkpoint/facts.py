"""What a stage needs to know of its input before any weights load, read in one trip (:func:`read_facts`): where
the model is, its config (and its text model's), the compute device, whether it can be read layer by layer, the
size and list of its weight files, and that the files' tensor shapes agree with the config. The stage runner
(:func:`draftkit.stages.run_stage_on`) reads them once and hands them to the stage's checks and its per-layer
form, which decides from them alone (streamed or resident, the memory estimate) before any weights load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from draftkit.checkpoint.files import load_config, weight_files
from draftkit.checkpoint.load import check_tensor_shapes, resolve_device
from draftkit.checkpoint.stream import is_streamable
from draftkit.modeling import text_config
from draftkit.refs import resolve_model_ref


class CheckpointFacts(NamedTuple):
    """A stage's input, as far as it can be known before any weights load."""

    name: str  # the model as named
    config: Any  # its transformers config
    device: Any  # the compute device
    can_stream: bool  # a local safetensors checkpoint, readable layer by layer
    size: int  # bytes of its weight files (0 for a hub id)
    files: tuple[Path, ...] = ()  # its safetensors weight files (none for a hub id, a .gguf file, .bin weights)
    text: Any = None  # the text model's config (``config`` itself but for multimodal models)


def checkpoint_bytes(location: str | os.PathLike) -> int:
    """Size of the weight files of a local checkpoint (safetensors, .bin or .pt shards)."""
    p = Path(location)
    if not p.is_dir():
        return 0
    files = list(p.glob("*.safetensors")) or list(p.glob("pytorch_model*.bin")) or list(p.glob("*.pt"))
    return sum(f.stat().st_size for f in files)


def read_facts(model_name: str, *, device: str = "auto", trust_remote_code: bool = False) -> CheckpointFacts:
    """The :class:`CheckpointFacts` of a model, before any weights load.

    Raises:
        ModelLoadError: the config cannot be read, a weight file is missing or links outside the folder, or a
            stored tensor's shape disagrees with the config (one line naming the file).
    """
    ref = resolve_model_ref(model_name)
    config = load_config(model_name, trust_remote_code=trust_remote_code)
    can_stream = ref.local and is_streamable(ref.location)
    size = checkpoint_bytes(ref.location) if ref.local else 0
    files = tuple(weight_files(ref.location, require_safetensors=False)) if ref.kind == "dir" else ()
    if files:  # a config that does not belong to the weights fails here, not after a whole load
        check_tensor_shapes(list(files), config, trust_remote_code=trust_remote_code, name=model_name)
    return CheckpointFacts(model_name, config, resolve_device(device), can_stream, size, files, text_config(config))
