"""Layer streaming on top of :class:`~draftkit.checkpoint.LazyCheckpoint` and
:func:`~draftkit.checkpoint.empty_model`: parameters mapped to checkpoint keys (shapes checked against
the config), modules filled and freed one at a time, and safetensors shards written as tensors are produced.

The design follows llm-compressor's sequential onloading and mergekit's lazy tensor reads, and goes
one step further on the host side: the output shards' layout (names, shapes, dtypes, offsets) is
declared before any data exists, so every tensor is written to disk the moment it is ready and no
shard is ever buffered in memory. Peak memory is one decoder layer plus the largest single tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from draftkit.checkpoint.complete import check_complete
from draftkit.checkpoint.files import SAFE_INDEX, SAFE_WEIGHTS, LazyCheckpoint
from draftkit.errors import ModelLoadError, NonFiniteError

# Checkpoints larger than this are streamed by default (SmolLM2-135M in float32 is 0.54 GB, the demo
# teacher 7 MB: both stay resident; a 4-layer Llama-3.2-1B-wide checkpoint is 0.97 GB).
STREAM_ABOVE_BYTES = 768 * 2**20

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def is_streamable(path: str | os.PathLike) -> bool:
    """A local directory with safetensors weights (one file or an index), which can be read layer by layer."""
    p = Path(path)
    return p.is_dir() and ((p / SAFE_INDEX).is_file() or (p / SAFE_WEIGHTS).is_file() or any(p.glob("*.safetensors")))


# ------------------------------------------------------------------------------------------ layers


def parameter_keys(model: nn.Module, ckpt: LazyCheckpoint) -> dict[str, str]:
    """Parameter name -> checkpoint key; tied parameters (lm_head tied to the embeddings) map to the
    key the checkpoint holds.

    Raises:
        ModelLoadError: a parameter is absent from the checkpoint, a stored tensor is used by no parameter
            or buffer (:func:`~draftkit.checkpoint.complete.check_complete`), or a shape disagrees with the config.
    """
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    keys: dict[str, str] = {}
    missing: list[str] = []
    for names in aliases.values():
        present = [n for n in names if n in ckpt.file_of]
        if not present:
            missing.append(names[0])
            continue
        for n in names:
            keys[n] = present[0]
    taken = set(keys) | {n for n, _ in model.named_buffers()}
    check_complete(str(ckpt.path), missing=missing, unused=[k for k in ckpt.keys() if k not in taken],
                   model=model, config=getattr(model, "config", None))
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, key in keys.items():
        want = tuple(params[name].shape)
        if ckpt.shape[key] != want:
            raise ModelLoadError(
                f"{ckpt.file_of[key].name}: tensor {key} has shape {list(ckpt.shape[key])} but config.json "
                f"implies {list(want)}: the config does not match the weights"
            )
    return keys


def load_module(module: nn.Module, prefix: str, keys: dict[str, str], ckpt: LazyCheckpoint, *,
                device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Give ``module`` (named ``prefix`` in the model) its parameters from the checkpoint, on ``device``."""
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    full = {n: f"{prefix}.{n}" if prefix else n for n in names}
    tensors = ckpt.read({keys[f] for f in full.values()}, device=device, dtype=dtype)
    for n in names:
        _set_parameter(module, n, tensors[keys[full[n]]])


def free_module(module: nn.Module) -> None:
    """Move ``module``'s parameters back to the meta device, releasing their memory."""
    for n, p in list(module.named_parameters(remove_duplicate=False)):
        _set_parameter(module, n, torch.empty_like(p, device="meta"))


def _set_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    sub._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def layer_key_pattern(prefix: str) -> re.Pattern:
    """``model.layers.12.mlp.up_proj.weight`` -> (12, ``mlp.up_proj.weight``) for ``prefix`` ``model.layers``."""
    return re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")


# ------------------------------------------------------------------------------------------ writing

_CHUNK = 16 * 2**20  # elements per slice when checking and writing a tensor


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(
            f"the result holds NaN/Inf weights in {name}; nothing was saved. "
            "The run diverged or its input is broken: check the input model, or use float32"
        )


def _stored_tensor(file: Path, name: str) -> tuple[tuple[int, int], str, list[int]]:
    """Absolute byte range, dtype name and shape of one tensor, from the safetensors header."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    entry = header[name]
    begin, end = entry["data_offsets"]
    return (8 + n + begin, 8 + n + end), entry["dtype"], entry["shape"]


def read_rows(file: Path, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` (along the first dimension) of tensor ``name`` of a safetensors file, read with
    plain file reads (no memory map), so a slice of a large tensor costs the slice's memory only."""
    (begin, end), dtype_name, shape = _stored_tensor(file, name)
    dtype = {v: k for k, v in _ST_DTYPES.items()}[dtype_name]
    shape = list(shape) or [1]
    row_bytes = math.prod(shape[1:]) * _itemsize(dtype)
    stop = min(stop, shape[0])
    buf = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
    with open(file, "rb") as f:
        f.seek(begin + start * row_bytes)
        got = f.readinto(buf.numpy().data)  # straight into the tensor: one copy of the slice in memory
    if got != buf.numel() or begin + stop * row_bytes > end:
        raise ModelLoadError(f"{file} is truncated inside {name}: copy or download it again")
    return buf.view(dtype).reshape([stop - start, *shape[1:]])


class ShardWriter:
    """Safetensors shards written tensor by tensor, in an order fixed up front.

    ``tensors`` lists every output tensor (name, shape, dtype) in the order it will be produced; shards
    are cut at ``max_shard_bytes`` (a larger tensor gets a shard of its own). Each shard's header is
    written when its first tensor arrives, and every tensor goes to disk at once. One shard is named
    ``model.safetensors``; several are ``model-0000i-of-0000N.safetensors`` with
    ``model.safetensors.index.json``, as ``save_pretrained`` writes them.
    """

    def __init__(self, out_dir: str | os.PathLike, tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 2 * 2**30):
        self.out = Path(out_dir)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in tensors:
            n = math.prod(entry[1]) * _itemsize(entry[2])
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += n
        total = len(shards)
        self.files = [SAFE_WEIGHTS] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self.shards = shards
        self.order = [e[0] for e in tensors]
        self.spec = {e[0]: e for e in tensors}
        self.shard_of = {e[0]: i for i, s in enumerate(shards) for e in s}
        self.total_size = sum(math.prod(e[1]) * _itemsize(e[2]) for e in tensors)
        self.next = 0
        self._file: BinaryIO | None = None
        self._shard = -1

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write tensors that come next in that order (in any order inside the dict).

        Raises:
            NonFiniteError: a tensor holds NaN/Inf (a diverged run or a broken input); the caller's
                temporary output is then discarded, so nothing is saved.
        """
        for name in sorted(tensors, key=self.order.index):
            t = tensors[name]
            _, shape, dtype = self.spec[name]
            if tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"shard writer: {name} has shape {list(t.shape)}, declared {list(shape)}")
            t = t.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
            self._begin(name)
            for start in range(0, t.numel(), _CHUNK):  # checked and written in slices: no whole-tensor copy
                part = t[start : start + _CHUNK]
                _check_finite(name, part)
                assert self._file is not None
                self._file.write(part.view(torch.uint8).numpy().data)
            self.next += 1

    def write_parts(self, name: str, parts) -> None:
        """Write tensor ``name`` as consecutive row slices (``parts`` yields tensors whose rows, joined,
        are the declared tensor), so a tensor larger than memory is never whole."""
        _, shape, dtype = self.spec[name]
        self._begin(name)
        rows = 0
        for part in parts:
            part = part.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
            _check_finite(name, part)
            assert self._file is not None
            self._file.write(part.view(torch.uint8).numpy().data)
            rows += part.numel()
        if rows != math.prod(shape):
            raise RuntimeError(f"shard writer: {name} got {rows} values in parts, declared {math.prod(shape)}")
        self.next += 1

    def copy(self, name: str, source: Path, src_name: str) -> None:
        """Write ``name`` as the bytes of tensor ``src_name`` of safetensors file ``source``, read with
        plain file reads in slices (no memory map, so the copy costs one slice of memory whatever the
        tensor's size). The dtype and shape must be the declared ones."""
        offsets, dtype_name, shape = _stored_tensor(source, src_name)
        _, want_shape, want_dtype = self.spec[name]
        if tuple(shape) != tuple(want_shape) or dtype_name != _ST_DTYPES[want_dtype]:
            raise RuntimeError(f"shard writer: {src_name} in {source} is {dtype_name}{list(shape)}, declared "
                               f"{_ST_DTYPES[want_dtype]}{list(want_shape)}")
        self._begin(name)
        step = _CHUNK * _itemsize(want_dtype)
        with open(source, "rb") as f:
            f.seek(offsets[0])
            left = offsets[1] - offsets[0]
            while left:
                buf = f.read(min(step, left))
                if not buf:
                    raise ModelLoadError(f"{source} is truncated inside {src_name}: download it again")
                left -= len(buf)
                if want_dtype.is_floating_point:
                    _check_finite(name, torch.frombuffer(bytearray(buf), dtype=want_dtype))
                assert self._file is not None
                self._file.write(buf)
        self.next += 1

    def _begin(self, name: str) -> None:
        expected = self.order[self.next] if self.next < len(self.order) else None
        if name != expected:
            raise RuntimeError(f"shard writer: got {name}, the order expects {expected}")
        shard = self.shard_of[name]
        if shard != self._shard:
            self._open(shard)

    def _open(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self.shards[shard]:
            n = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = file = open(self.out / self.files[shard], "wb")  # noqa: SIM115 - closed in _open/close
        file.write(len(raw).to_bytes(8, "little") + raw)
        self._shard = shard

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.next != len(self.order):
            raise RuntimeError(f"shard writer: {len(self.order) - self.next} declared tensors were never written")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: self.files[self.shard_of[name]] for name in self.order},
            }
            (self.out / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
