"""Load a whole model from any input draftkit accepts; devices and dtypes. See :mod:`draftkit.checkpoint`."""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from draftkit.checkpoint.complete import check_complete
from draftkit.checkpoint.files import (
    LazyCheckpoint,
    check_cached_snapshot,
    first_line,
    is_quantized_too,
    is_sparse_checkpoint,
    load_config,
    sync_progress_bars,
    translate_load_error,
    weight_files,
)
from draftkit.errors import InvalidInputError, ModelLoadError
from draftkit.input_errors import reading
from draftkit.refs import ModelRef, resolve_model_ref

DType = Literal["auto", "float32", "bfloat16", "float16"]
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")




def check_device(device: str) -> str:
    """The device name normalised; an unknown one (``gpu``) is an error listing the valid names."""
    name = str(device).strip().lower()
    if not _DEVICE.fullmatch(name):
        raise InvalidInputError(f"unknown device {device!r}: use {DEVICE_NAMES}")
    return name


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are checked."""
    name = check_device(device)
    if name in ("auto", "cuda") and torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")  # accelerate/torchrun: each its own GPU
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidInputError(f"--device {name} was asked for but no CUDA GPU is available: use --device auto or cpu")
        count, index = torch.cuda.device_count(), int(name.partition(":")[2] or 0)
        if index >= count:
            raise InvalidInputError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError("--device mps was asked for but MPS is not available: use --device auto or cpu")
    return torch.device(name)


def torch_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise InvalidInputError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None




def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """The model's tokenizer (a GGUF file's own, chat template included); pad falls back to eos."""
    tok = _tokenizer_of(_gguf_converted(resolve_model_ref(name), trust_remote_code), trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _gguf_converted(ref: ModelRef, trust_remote_code: bool) -> ModelRef:
    """A GGUF ``ref``'s converted folder (:mod:`draftkit.checkpoint.gguf_cache`), converting it the first time."""
    from draftkit import console
    from draftkit.checkpoint import gguf_cache

    hit = gguf_cache.lookup(ref)
    if ref.kind != "gguf" or hit is not ref or not gguf_cache.enabled():
        return hit
    console.info(f"[dim]{ref.location}: dequantizing it once (kept in {gguf_cache.cache_folder(ref.location)})[/dim]")
    model = _load_pretrained(ref, "auto", trust_remote_code)
    return gguf_cache.store(ref, model, _tokenizer_of(ref, trust_remote_code))


def _tokenizer_of(ref: ModelRef, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref.hf_path, trust_remote_code=trust_remote_code, **ref.hf_kwargs)
    except Exception as exc:  # noqa: BLE001
        raise translate_load_error(ref, exc, "the tokenizer of ") from exc


def empty_model(config, *, trust_remote_code: bool = False, name: str = ""):
    """The model built from ``config`` with every parameter on the meta device (no memory) and real
    buffers (rotary frequencies), for filling one module at a time.

    Raises:
        ModelLoadError: transformers cannot build a model from ``config`` (an unknown activation, a
            vocabulary of 2**40 whose embedding cannot even be reserved...); ``name`` is the model named.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a config no model can be built from is the user's file
        where = name or getattr(config, "name_or_path", "") or "the model"
        raise ModelLoadError(f"{where}: config.json describes no model transformers can build ({first_line(exc)}): "
                             "restore the checkpoint's own config.json") from exc
    return model.eval()


_SHAPES_CHECKED: set[tuple] = set()  # checks that passed (check_tensor_shapes)


def check_tensor_shapes(files: list[Path], config, *, trust_remote_code: bool = False, name: str = "") -> None:
    """Each stored tensor's shape (read from the safetensors headers) against the shape ``config`` implies.

    A check that passed is remembered for the same files (path, size, modification time) and config, so the
    stage runner's facts trip and the loader after it read the headers once.

    Raises:
        ModelLoadError: a shape disagrees, a header cannot be read, or no model can be built from ``config``.
    """
    from safetensors import safe_open

    try:
        checked = (tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files), config.to_json_string(),
                   trust_remote_code)
    except OSError:  # a missing file: the check below says which, in one line
        checked = None
    if checked is not None and checked in _SHAPES_CHECKED:
        return
    model = empty_model(config, trust_remote_code=trust_remote_code, name=name or (str(files[0].parent) if files else ""))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for f in files:
        with reading(f, "safetensors file"), safe_open(str(f), framework="pt") as h:
            stored = {key: tuple(h.get_slice(key).get_shape()) for key in h.keys()}
        for key, got in stored.items():
            want = expected.get(key)
            if want is not None and got != want:
                raise ModelLoadError(
                    f"{f}: tensor {key} has shape {list(got)} but config.json implies {list(want)}: "
                    "the config does not belong to these weights (restore the checkpoint's own config.json)"
                )
    if checked is not None:
        _SHAPES_CHECKED.add(checked)


def load_model(name: str, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """Load a causal LM from anything draftkit accepts as a model (see the module docstring).

    Args:
        name: local directory, ``.gguf`` file, alias from :data:`draftkit.refs.ALIASES`, or hub id.
        dtype: ``auto`` keeps the checkpoint's own dtype (float32 for a dequantized GGUF).
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        trust_remote_code: allow code from the model repository to run. Off unless the user asks.

    Returns:
        The ``transformers`` model in eval mode on ``device`` (tokenizer: :func:`load_tokenizer`).

    Raises:
        ModelLoadError: one line naming what is wrong (missing shard, shape mismatch, unknown architecture...).
    """
    target = resolve_device(device)  # fail on a bad device before reading any weights
    sync_progress_bars()
    ref = resolve_model_ref(name)
    if not ref.local:
        from draftkit.hub import check_hub

        check_hub(ref.location)
        check_cached_snapshot(ref)
    ref = _gguf_converted(ref, trust_remote_code)  # a GGUF file: dequantized once per content, then safetensors
    if ref.kind == "dir" and is_sparse_checkpoint(ref.location):
        model = _load_sparse(ref, dtype, trust_remote_code)
    else:
        model = _load_pretrained(ref, dtype, trust_remote_code)
    model.eval()
    return model.to(target)


def load_model_and_tokenizer(name: str, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """``(load_model(name, ...), load_tokenizer(name))``."""
    model = load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return model, load_tokenizer(name, trust_remote_code=trust_remote_code)


def _load_pretrained(ref: ModelRef, dtype: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    if ref.kind == "gguf":
        try:
            import gguf  # noqa: F401 - transformers' GGUF reader needs it
        except ImportError as exc:
            raise translate_load_error(ref, exc) from None
    config = load_config(ref.name, trust_remote_code=trust_remote_code)
    if ref.kind == "dir":
        files = weight_files(ref.location, require_safetensors=False)
        check_tensor_shapes(files, config, trust_remote_code=trust_remote_code, name=ref.name)
    try:
        with _gguf_progress():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                ref.hf_path, config=config, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
                use_safetensors=None, output_loading_info=True, **ref.hf_kwargs,
            )
    except Exception as exc:  # noqa: BLE001
        raise translate_load_error(ref, exc) from exc
    model, info = loaded
    check_complete(ref.name, missing=info["missing_keys"], unused=info["unexpected_keys"], model=model, config=config)
    quantizer = getattr(model, "hf_quantizer", None)
    if ref.kind == "gguf" and quantizer is not None:
        quantizer.remove_quantization_config(model)  # dequantized already: save as ordinary safetensors
    return model


@contextlib.contextmanager
def _gguf_progress() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar: shown only with --verbose (and progress on), like the
    other libraries' bars."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from draftkit.console import progress_enabled, verbose

    original = gguf_utils.tqdm
    if not (progress_enabled() and verbose()):
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_sparse(ref: ModelRef, dtype: str, trust_remote_code: bool):
    """draftkit's sparse-bitmask export, decompressed in memory (transformers 5 cannot read it)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if is_quantized_too(ref.location):
        raise ModelLoadError(f"{ref.name} is quantized as well as sparse: load it with compressed-tensors, not draftkit")
    config = load_config(ref.name, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    ckpt = LazyCheckpoint(ref.location)
    state = ckpt.read(ckpt.keys())
    if dtype != "auto":
        want = torch_dtype(dtype)
        state = {k: v.to(want) if v.is_floating_point() else v for k, v in state.items()}
    stored = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    try:
        model_cls: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ModelLoadError(f"{ref.name}: model type {config.model_type!r} is not a transformers causal LM") from None
    try:
        model, info = model_cls.from_pretrained(None, config=config, state_dict=state, dtype=stored, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not load the sparse checkpoint {ref.name}: {first_line(exc)}") from exc
    check_complete(ref.name, missing=info["missing_keys"], unused=info["unexpected_keys"], model=model, config=config)
    return model
