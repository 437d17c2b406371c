"""The compute dtype: what forwards run in (calibration, scoring, regeneration, eval, spec), apart from the
dtype weights are stored and saved in.

``auto`` picks bfloat16 where the device runs it fast and float32 elsewhere:

* a CUDA device that supports bf16 (Ampere and later);
* a CPU with AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``) in ``/proc/cpuinfo``: oneDNN runs bf16
  matrix products there several times faster than float32 (5.2x measured on this project's machine);
* Apple MPS where it takes bf16 tensors (macOS 14 and later).

A stage runs inside :func:`computing` (the choice is a context variable, so stage signatures stay
``(model, tokenizer, cfg)``); code that runs forwards reads :func:`current_dtype` (None outside a stage:
the model's own dtype, as before). Weights are cast for a forward and put back exactly afterwards
(:func:`cast_for_compute`, :class:`Masters`), so a float32 checkpoint computed in bf16 is saved in float32.
The numerically sensitive parts never use the compute dtype: SparseGPT's Hessian accumulates in float32
(bf16 inputs), its Cholesky factor and column updates work on float32 copies of the master weights, and
training keeps float32 master weights and optimizer state (``precision``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

ComputeSetting = Literal["auto", "float32", "bfloat16", "float16"]
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # either one: oneDNN's fast bf16 matmul paths
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ComputeChoice:
    """The resolved compute dtype and why it was chosen (printed, and recorded in reports)."""

    dtype: torch.dtype
    why: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def line(self) -> str:
        return f"compute {self.name} ({self.why})"

    def facts(self) -> dict[str, str]:
        return {"dtype": self.name, "why": self.why}


@functools.cache
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor listed (empty where the file does not exist)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _cuda_bf16(device: torch.device) -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def _mps_bf16() -> bool:
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True


def fast_bf16(device: torch.device | str, *, flags: frozenset[str] | set[str] | None = None) -> str | None:
    """Why ``device`` runs bf16 fast (a few words), or None when it does not."""
    device = torch.device(device)
    if device.type == "cuda":
        return "CUDA device with bf16 support" if _cuda_bf16(device) else None
    if device.type == "mps":
        return "Apple MPS with bf16 support" if _mps_bf16() else None
    if device.type == "cpu":
        have = [f for f in CPU_BF16_FLAGS if f in (cpu_flags() if flags is None else flags)]
        return f"CPU has {' and '.join(f.upper() for f in have)}" if have else None
    return None


def resolve_compute(setting: str, device: torch.device | str, *, flags: frozenset[str] | set[str] | None = None,
                    stage: str | None = None) -> ComputeChoice:
    """``setting`` on ``device``: an explicit dtype as asked; ``auto`` is bfloat16 where :func:`fast_bf16` says
    so and float32 elsewhere (and for a stage that registers ``auto_float32``, float32 with its reason)."""
    if setting != "auto":
        return ComputeChoice(_DTYPES[setting], "asked")
    from draftkit.registry import stage as registered

    entry = registered(stage or "")
    if entry is not None and entry.auto_float32:  # a stage whose result bf16 changes beyond noise (README)
        return ComputeChoice(torch.float32, f"auto: {entry.auto_float32}")
    why = fast_bf16(device, flags=flags)
    if why is not None:
        return ComputeChoice(torch.bfloat16, f"auto: {why}")
    return ComputeChoice(torch.float32, f"auto: no fast bf16 on {torch.device(device).type}")


# ------------------------------------------------------------------------------------------------
# The current choice
# ------------------------------------------------------------------------------------------------

_current: contextvars.ContextVar[ComputeChoice | None] = contextvars.ContextVar("draftkit_compute", default=None)


def current() -> ComputeChoice | None:
    """The compute choice of the running stage (None outside one)."""
    return _current.get()


def current_dtype() -> torch.dtype | None:
    """The compute dtype of the running stage, or None: compute in the weights' own dtype."""
    choice = _current.get()
    return None if choice is None else choice.dtype


def load_dtype(default: str | None = "auto") -> str | None:
    """The dtype name to load a model that is only run (a teacher, a target, a baseline) in: the compute
    dtype inside a stage, else ``default``."""
    choice = _current.get()
    return default if choice is None else choice.name


@contextlib.contextmanager
def computing(choice: ComputeChoice | None) -> Iterator[ComputeChoice | None]:
    """Run the block with ``choice`` as the compute dtype."""
    token = _current.set(choice)
    try:
        yield choice
    finally:
        _current.reset(token)


# ------------------------------------------------------------------------------------------------
# Casting weights for a forward, exactly undone afterwards
# ------------------------------------------------------------------------------------------------


class Masters:
    """Parameters cast to the compute dtype, each with its master tensor (the stored dtype, untouched).

    ``cast(module)`` points each floating parameter of ``module`` at a compute-dtype copy and keeps the
    original; ``restore(module)`` points them back (no copy, no rounding). A driver that edits weights
    (SparseGPT) writes the new values to :meth:`master` and to the live parameter.
    """

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype
        self._by_param: dict[nn.Parameter, torch.Tensor] = {}

    def cast(self, module: nn.Module) -> nn.Module:
        if self.dtype is None:
            return module
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != self.dtype and p not in self._by_param and p.device.type != "meta":
                self._by_param[p] = p.data
                p.data = p.data.to(self.dtype)
        return module

    def restore(self, module: nn.Module) -> None:
        for p in module.parameters():
            master = self._by_param.pop(p, None)
            if master is not None:
                p.data = master

    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The stored-dtype tensor behind parameter ``p``, or behind a view of one (an MoE expert's row of a
        fused parameter, :class:`draftkit.moe.experts.ExpertLinear`): the same view of the master. ``p``
        itself when it was not cast."""
        found = self._by_param.get(p)  # type: ignore[call-overload]
        if found is not None:
            return found
        if self._by_param:
            ptr = p.untyped_storage().data_ptr()
            for live, m in self._by_param.items():
                if live.untyped_storage().data_ptr() == ptr and live.stride() == m.stride():
                    return m.as_strided(p.size(), p.stride(), m.storage_offset() + p.storage_offset() - live.storage_offset())
        return p


@contextlib.contextmanager
def cast_for_compute(model: nn.Module | None, dtype: torch.dtype | None = None) -> Iterator[Masters]:
    """``model``'s weights in ``dtype`` (default: the current compute dtype) for the block; afterwards every
    parameter is its original tensor again. Buffers (rotary frequencies) are left alone."""
    masters = Masters(current_dtype() if dtype is None else dtype)
    if model is not None:
        masters.cast(model)
    try:
        yield masters
    finally:
        if model is not None:
            masters.restore(model)


def to_compute(value: Any, dtype: torch.dtype | None, memo: dict[int, tuple[Any, Any]] | None = None) -> Any:
    """``value`` with every floating tensor in it (nested in tuples, lists, dicts) cast to ``dtype``. With ``memo``
    (kept by the caller), a tensor met again is cast once: the position embeddings every decoder layer receives
    stay one tensor, not one copy per layer."""
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dtype == dtype:
            return value
        if memo is not None and id(value) in memo:
            return memo[id(value)][1]
        info = torch.finfo(dtype)  # float32's min (an additive mask) would round to -inf in bf16: NaN rows
        cast = value.clamp(info.min, info.max).to(dtype)
        if memo is not None:
            memo[id(value)] = (value, cast)  # the original is kept so that its id is not reused meanwhile
        return cast
    if isinstance(value, tuple):
        return tuple(to_compute(v, dtype, memo) for v in value)
    if isinstance(value, list):
        return [to_compute(v, dtype, memo) for v in value]
    if isinstance(value, dict):
        return {k: to_compute(v, dtype, memo) for k, v in value.items()}
    return value
