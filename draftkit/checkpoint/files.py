"""Checkpoint files: which safetensors files a directory holds, lazy per-tensor reading across shards,
the config, and the one-line translation of loading errors. See :mod:`draftkit.checkpoint`."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from draftkit.bitmask import (
    QUANT_METHOD,
    SPARSE_FORMAT,
    bitmask_decompress,
    compressed_groups,
    layout_problem,
)
from draftkit.checkpoint import gguf_cache
from draftkit.errors import ModelLoadError
from draftkit.input_errors import first_line, reading
from draftkit.model_files import SAFE_INDEX, check_folder, folder_root, index_names, resolve_file
from draftkit.refs import ModelRef, resolve_model_ref

SAFE_WEIGHTS = "model.safetensors"
_SHARD = re.compile(r"(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors")


def translate_load_error(ref: ModelRef, exc: BaseException, what: str = "") -> ModelLoadError:
    """One line for a transformers / hub / gguf failure to load ``ref``."""
    import transformers

    text, name = str(exc), ref.name
    arch = re.search(r"model type `([^`]+)`", text)
    if "trust_remote_code" in text:
        msg = f"{name} needs code from its repository: pass --trust-remote-code if you trust it"
    elif arch and "does not recognize" in text:
        msg = (f"{name}: model type {arch[1]!r} is unknown to transformers {transformers.__version__}: upgrade it "
               "(pip install -U transformers), or pass --trust-remote-code if the repository ships its code")
    elif "Unrecognized configuration class" in text:
        msg = f"{name} is not a causal language model (transformers has no AutoModelForCausalLM for its config)"
    elif "GGUF model with architecture" in text:
        msg = f"{name}: {first_line(exc)} (transformers {transformers.__version__}); convert it to safetensors with llama.cpp"
    elif isinstance(exc, ImportError) and "gguf" in text.lower():
        msg = f"{name} is a GGUF file: reading it needs the gguf package (pip install 'draftkit[gguf]')"
    elif "size mismatch" in text or "ignore_mismatched_sizes" in text:
        msg = f"{name}: tensor shapes in the weights disagree with config.json (DRAFTKIT_DEBUG=1 shows which)"
    elif isinstance(exc, RecursionError) or "maximum recursion depth" in text:
        msg = f"could not load {what}{name}: a JSON file in it is nested too deeply to read: restore the checkpoint's own config files"
    elif not ref.local:
        msg = (f"could not load {name} ({ref.location}) from the hub: {first_line(exc)}; "
               "pass a local directory, or check the network and HF_TOKEN")
    else:
        msg = f"could not load {what}{name}: {first_line(exc)}"
    return ModelLoadError(msg)


def load_config(name: str, *, trust_remote_code: bool = False):
    """The model's transformers config only (cheap: lets commands check settings before loading weights)."""
    from transformers import AutoConfig

    ref = resolve_model_ref(name)
    if not ref.local:
        from draftkit.hub import check_hub

        check_hub(ref.location)  # one line at once when the hub is unreachable, not ~30 s of retries
    ref = gguf_cache.lookup(ref)  # a GGUF file converted before: its folder's config
    try:
        return AutoConfig.from_pretrained(ref.hf_path, trust_remote_code=trust_remote_code, **ref.hf_kwargs)
    except Exception as exc:  # noqa: BLE001
        raise translate_load_error(ref, exc, "the config of ") from exc


def sync_progress_bars() -> None:
    """transformers' own loading/saving bars show only with --verbose (and progress on)."""
    import transformers

    from draftkit.console import progress_enabled, verbose

    if progress_enabled() and verbose():
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()




def weight_files(directory: str | os.PathLike, *, require_safetensors: bool = True) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order.

    Returns ``[]`` for a checkpoint with only PyTorch ``.bin`` weights when ``require_safetensors`` is
    False. Raises :class:`ModelLoadError` naming the file for an index that names an absent file, a
    missing shard, shards without an index, or no weights at all.
    """
    p = Path(directory)
    root = folder_root(p)
    names = index_names(p)
    if names is not None:
        paths = [resolve_file(p, n, source=p / SAFE_INDEX, root=root) for n in names]
        missing = [n for n, f in zip(names, paths, strict=True) if not f.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelLoadError(f"{p / SAFE_INDEX} names {missing[0]}{more}, which is not in {p}: "
                                 "the checkpoint is incomplete; copy or download the missing file")
        return paths
    if (p / SAFE_WEIGHTS).is_file():
        return [resolve_file(p, SAFE_WEIGHTS, root=root)]
    files = sorted(p.glob("*.safetensors"))
    for f in files:
        m = _SHARD.fullmatch(f.name)
        if m:
            n = int(m["n"])
            absent = [f"{m['stem']}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
            absent = [name for name in absent if not (p / name).is_file()]
            if absent:
                raise ModelLoadError(f"{p} is missing shard {absent[0]} ({n - len(absent)} of {n} present): "
                                     "copy or download the missing shard")
    if len(files) > 1:
        raise ModelLoadError(f"{p} has {len(files)} .safetensors files but no {SAFE_INDEX}: copy the index too")
    if files:
        return [resolve_file(p, f.name, root=root) for f in files]
    if any(p.glob("*.bin")) or any(p.glob("*.pt")):
        if not require_safetensors:
            return []
        raise ModelLoadError(
            f"{p} holds PyTorch .bin weights only; this needs safetensors: convert it once with "
            f"AutoModelForCausalLM.from_pretrained('{p}').save_pretrained('{p}-safetensors')"
        )
    raise ModelLoadError(f"{p} has no weights (no model.safetensors, shards with {SAFE_INDEX}, or pytorch_model.bin)")


def sparsity_config_of(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``sparsity_config`` of a ``sparse-bitmask`` checkpoint, or None for any other checkpoint."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError, AttributeError, RecursionError):
        return None  # not one: loading the config reports what is wrong with it
    sc = qc.get("sparsity_config") or {}
    if qc.get("quant_method") == QUANT_METHOD and sc.get("format") == SPARSE_FORMAT:
        return sc
    return None


def is_sparse_checkpoint(path: str | os.PathLike) -> bool:
    return sparsity_config_of(path) is not None


def is_quantized_too(path: str | os.PathLike) -> bool:
    """A compressed-tensors checkpoint with quantization groups besides its sparsity."""
    qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    return bool(qc.get("config_groups"))


# safetensors dtype names -> torch dtype names (those this torch lacks are left out, and refused when met)
_ST_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}
_ST_DTYPES = {k: getattr(torch, v) for k, v in _ST_DTYPE_NAMES.items() if hasattr(torch, v)}


def stored_dtype(file: Path, key: str, name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name; one that torch cannot hold is an error, never float32."""
    try:
        return _ST_DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"{file}: tensor {key} is stored as {name}, which torch {torch.__version__} cannot "
                             "hold: convert the checkpoint to float32, float16 or bfloat16 safetensors") from None


def _damaged(file: Path, module: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"{file}: the sparse weight {module} is inconsistent ({why}): the export is damaged or "
                          "was altered; export it again from its source model")


class LazyCheckpoint:
    """The tensors of a local safetensors checkpoint (one file or shards with an index), read on demand.

    Only headers are read here; :meth:`read` opens each shard it needs once and closes it again, so
    reading a layer costs that layer's memory, not the file's. Keys are state-dict names: in a
    sparse-bitmask checkpoint ``M.weight`` stands for the four tensors of its layout and is decompressed
    when read.

    Attributes:
        file_of, shape, dtype: per key, the shard that holds it, its shape and its dtype.

    Raises:
        ModelLoadError: no safetensors weights, an unreadable index or shard, or a missing shard.
    """

    def __init__(self, path: str | os.PathLike, *, trust_remote_code: bool = False):
        from safetensors import safe_open

        self.path = Path(path)
        self.files = weight_files(self.path)
        self._trust_remote_code = trust_remote_code
        self._config: Any = None
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        stored: dict[str, Path] = {}
        stored_shape: dict[str, list[int]] = {}
        for file in self.files:
            with reading(file, "safetensors file"), safe_open(str(file), framework="pt") as f:
                header = {key: (f.get_slice(key).get_shape(), f.get_slice(key).get_dtype()) for key in f.keys()}
            for key, (shape, dtype_name) in header.items():
                stored[key] = file
                stored_shape[key] = list(shape)
                self.shape[key] = tuple(shape)
                self.dtype[key] = stored_dtype(file, key, dtype_name)
        self._stored = stored
        self.sparse_modules = compressed_groups(stored)
        for prefix in self.sparse_modules:
            absent = [leaf for leaf in ("compressed", "bitmask", "shape") if f"{prefix}.{leaf}" not in stored]
            if absent:
                raise _damaged(stored[f"{prefix}.bitmask"], prefix, f"it has no {prefix}.{absent[0]}")
            shape_key = f"{prefix}.shape"
            if stored_shape[shape_key] != [2] or self.dtype[shape_key] not in (torch.int64, torch.int32):
                raise _damaged(stored[shape_key], prefix, f"{shape_key} is {stored_shape[shape_key]}, not two integers")
        for key, file in stored.items():
            prefix, _, leaf = key.rpartition(".")
            if prefix not in self.sparse_modules:
                self.file_of[key] = file
            elif leaf == "compressed":  # M.weight stands for the group; its shape is stored in M.shape
                name = f"{prefix}.weight"
                shape = [int(x) for x in self._read_stored([f"{prefix}.shape"])[f"{prefix}.shape"].tolist()]
                problem = layout_problem(shape, stored_shape[key], stored_shape[f"{prefix}.bitmask"])
                if problem:
                    raise _damaged(file, prefix, problem)
                self.file_of[name] = file
                self.dtype[name] = self.dtype[key]
                self.shape[name] = tuple(shape)

    @property
    def config(self):
        """The transformers config (read once)."""
        if self._config is None:
            self._config = load_config(str(self.path), trust_remote_code=self._trust_remote_code)
        return self._config

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def nbytes(self, keys: Iterable[str] | None = None) -> int:
        """Bytes of the named tensors once read (dense), all of them by default."""
        keys = self.file_of if keys is None else keys
        return sum(math.prod(self.shape[k]) * torch.empty((), dtype=self.dtype[k]).element_size() for k in keys)

    def _read_stored(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k not in self._stored:
                raise ModelLoadError(f"{self.path}: the checkpoint has no tensor {k}: it does not match its config.json")
            by_file.setdefault(self._stored[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            with reading(file, "safetensors file"), safe_open(str(file), framework="pt") as f:
                for k in names:
                    out[k] = f.get_tensor(k)
        return out

    def read(self, keys: Iterable[str], *, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (dense), each shard opened once and closed before returning."""
        keys = list(keys)
        groups = {k: k[: -len(".weight")] for k in keys if k.endswith(".weight") and k[: -len(".weight")] in self.sparse_modules}
        raw = self._read_stored([f"{g}.{leaf}" for g in groups.values() for leaf in ("compressed", "bitmask", "shape")]
                                + [k for k in keys if k not in groups])
        out: dict[str, torch.Tensor] = {}
        for k in keys:
            g = groups.get(k)
            if g is None:
                t = raw[k]
            else:
                try:
                    t = bitmask_decompress(raw[f"{g}.compressed"], raw[f"{g}.bitmask"], raw[f"{g}.shape"])
                except ValueError as exc:
                    raise _damaged(self.file_of[k], g, str(exc)) from None
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[k] = t.to(device)
        return out

    def get(self, key: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.read([key], device=device, dtype=dtype)[key]


def open_checkpoint(name: str, *, trust_remote_code: bool = False) -> LazyCheckpoint:
    """Lazy per-tensor access to a directory, hub id or alias (fetched into the hub cache first)."""
    ref = resolve_model_ref(name)
    if ref.kind == "gguf":
        raise ModelLoadError(f"{name}: a GGUF file is dequantized whole, not read tensor by tensor; "
                             "convert it once (draftkit export --format dense) to stream it")
    directory = ref.location if ref.kind == "dir" else hub_snapshot(ref)
    return LazyCheckpoint(directory, trust_remote_code=trust_remote_code)


def hub_snapshot(ref: ModelRef) -> str:
    """The local folder of a hub model's config, tokenizer and safetensors (downloaded once into the cache)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(ref.location, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"])
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise translate_load_error(ref, exc) from exc
    check_folder(folder)  # its links may point into the repository's blobs, nowhere else
    return folder


def check_cached_snapshot(ref: ModelRef) -> None:
    """A hub model already in the local cache: its snapshot folder is checked like a local folder before
    transformers reads it (links into the repository's blobs only, index entries inside)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(ref.location, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or not a hub id): transformers downloads it and reports
        return
    check_folder(folder)


def read_stored_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor as stored (a sparse-bitmask group stays its four tensors)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        with reading(f, "safetensors file"):
            out.update(load_file(str(f)))
    return out
