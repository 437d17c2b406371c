"""FSDP2 (``torch.distributed.fsdp.fully_shard``) in the distill training loop: the sparsity masks held on
sharded weights, the trained model gathered whole for the mask check and for saving.

Two routes reach it, both in :func:`draftkit.distill.train.train_sequences`:

- ``accelerate launch`` with an FSDP (version 2) accelerate config, on GPUs: ``accelerator.prepare`` shards
  the loss module (each decoder layer one unit, from ``_no_split_modules``; the rest the root unit).
- ``fsdp`` (``--fsdp``) under ``torchrun``/``accelerate launch``, on any backend, gloo on CPUs included:
  :func:`shard_for_fsdp` makes the same units and accelerate only shards the data.

accelerate (1.15) routes FSDP on GPUs only: ``accelerate launch --use_fsdp`` picks its multi-GPU launcher only
without ``--cpu`` (``commands/launch.py``), and ``AcceleratorState`` switches to ``DistributedType.FSDP`` only
from a multi-GPU-like type, never from ``MULTI_CPU`` (``state.py``); without a GPU it silently trains with DDP.
No accelerate setting changes that, so FSDP on CPUs (and its test) takes the second route.
"""

from __future__ import annotations

import torch
from torch import nn

from draftkit.errors import DraftkitError, InvalidInputError
from draftkit.sparsify.masks import apply_masks, masked_weight

__all__ = ["MaskHold", "check_fsdp", "gather_full_model", "is_sharded", "shard_for_fsdp"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return None
    return DTensor


def _is_dtensor(t) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is all-gathered (a collective: every rank calls it, in the same order)."""
    dtensor = _dtensor_type()
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor) else t


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2-sharded)."""
    return any(_is_dtensor(p) for p in model.parameters())


def shard_for_fsdp(module: nn.Module, mesh=None) -> nn.Module:
    """Shard ``module`` in place with FSDP2 as accelerate's FSDP2 plugin does by default: each submodule whose
    class is in ``module._no_split_modules`` (the decoder layers) is one unit, the rest the root unit, whose
    ``forward`` must be what training calls (the loss module). Needs an initialised process group (accelerate's
    ``PartialState`` under ``torchrun``); the weights keep the dtype they have here."""
    from torch.distributed.fsdp import fully_shard

    layer_names = set(getattr(module, "_no_split_modules", None) or ())
    for sub in [m for m in module.modules() if m is not module and type(m).__name__ in layer_names]:
        fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def check_fsdp(accelerator, *, lora: bool, own: bool) -> None:
    """Refuse what training under FSDP does not support: LoRA, and draftkit's own sharding in one process."""
    from accelerate import DistributedType

    if lora and (own or accelerator.distributed_type == DistributedType.FSDP):
        raise InvalidInputError("LoRA under FSDP is not supported: use full fine-tuning, or DDP for LoRA")
    if own and accelerator.num_processes < 2:
        raise InvalidInputError("--fsdp shards the student over several processes: start them with torchrun or "
                                "accelerate launch (or drop --fsdp)")


class MaskHold:
    """:func:`~draftkit.sparsify.masks.apply_masks` after each optimizer step, also for FSDP2's sharded
    (DTensor) weights: each rank multiplies its shard of the weight by the same shard of the full keep-mask
    (``distribute_tensor`` with the weight's mesh and placements, cut locally once and kept)."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks
        self._local: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        plain = {}
        for name, keep in self.masks.items():
            w = masked_weight(model, name)
            if _is_dtensor(w):
                local = self._local.get(name)
                if local is None:
                    from torch.distributed.tensor import distribute_tensor

                    local = distribute_tensor(keep.to(w.device), w.device_mesh, w.placements, src_data_rank=None).to_local()
                    self._local[name] = local
                w.to_local().mul_(local)
            else:
                plain[name] = keep
        apply_masks(model, plain)


@torch.no_grad()
def gather_full_model(model: nn.Module) -> nn.Module:
    """A plain (unsharded) copy of a FSDP2-sharded transformers model, on the CPU, on every rank.

    Each weight is all-gathered in turn (one full tensor at a time on the device) into a model of the same
    class built on the meta device; buffers (rotary frequencies) are copied, tied weights re-tied.
    """
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
    gathered: dict[int, torch.Tensor] = {}
    state = {}
    for name, t in model.state_dict(keep_vars=True).items():  # keep_vars: a tied weight is gathered once
        if id(t) not in gathered:
            gathered[id(t)] = _full(t.detach()).cpu()
        state[name] = gathered[id(t)]
    with torch.device("meta"):
        plain = cls(model.config)
    result = plain.load_state_dict(state, assign=True, strict=False)
    if result.unexpected_keys:
        raise DraftkitError(f"gathering the FSDP-sharded model: {cls.__name__} has no {result.unexpected_keys[0]}")
    for name, buf in model.named_buffers():
        parent, _, leaf = name.rpartition(".")
        plain.get_submodule(parent)._buffers[leaf] = _full(buf).detach().cpu()
    tie = getattr(plain, "tie_weights", None)
    if callable(tie):
        tie()
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, p in plain.named_parameters():
        if p.is_meta:
            raise DraftkitError(f"gathering the FSDP-sharded model: {name} has no weights after the gather")
        p.requires_grad_(trainable.get(name, p.requires_grad))
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain.train(model.training)
