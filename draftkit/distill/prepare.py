"""Getting a student ready to train: precision, activation checkpointing, masked LoRA, the optimizer.

Each memory switch is a field of :class:`~draftkit.distill.config.DistillConfig`, as in torchtune's
single-device recipes; this module turns them into a model and an optimizer and undoes them afterwards.
"""

from __future__ import annotations

import types
from contextlib import nullcontext

import torch
from torch import nn

from draftkit import console
from draftkit.distill.config import DistillConfig
from draftkit.errors import InvalidInputError
from draftkit.sparsify.masks import target_linears

CHECKPOINTING_ABOVE = 1_000_000_000  # parameters: activation checkpointing is on by default above this


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


def pin_accelerator_device(device: torch.device) -> None:
    """Make ``device`` (``--device cuda:N``) the GPU accelerate trains on. In one process accelerate places
    everything on ``cuda``, the current GPU (cuda:0 unless set), and would move a student loaded on cuda:N there;
    under torchrun/accelerate launch each process's GPU is its local rank's, as accelerate sets it."""
    import os

    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        torch.cuda.set_device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16-mixed`` on a GPU that supports bf16, ``fp32`` elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "fp32"


def set_precision(model: nn.Module, precision: str, *, trainable_only: bool = False):
    """Cast the weights for ``precision``: float32 master weights for ``fp32`` and ``bf16-mixed`` (so the
    optimizer's small updates are not rounded away), bfloat16 for ``bf16-true``. With ``trainable_only`` (LoRA
    under ``bf16-mixed``) the frozen base keeps its dtype. Buffers (e.g. rotary frequencies) are left alone.

    Returns a function that casts the parameters back to the dtypes they had (the saved student keeps the
    checkpoint's dtype).
    """
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    if precision == "bf16-true":
        console.warn("--precision bf16-true: weights and AdamW state in bfloat16; updates smaller than a weight's "
                     "bf16 spacing are lost (at lr 2e-5 most of them): prefer bf16-mixed")
    before = {}  # by identity: a Parameter survives peft's wrapping and unloading, its name does not
    by_name = {}  # and by name: FSDP replaces the Parameters (sharded, then gathered into a plain copy)
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != dtype and (p.requires_grad or not trainable_only):
            before[id(p)] = by_name[name] = p.dtype
            p.data = p.data.to(dtype)

    def restore(trained: nn.Module) -> None:
        for name, p in trained.named_parameters():
            old = before.get(id(p), by_name.get(name))
            if old is not None and p.dtype != old:
                p.data = p.data.to(old)

    return restore


def autocast(precision: str, device: torch.device):
    """bf16 autocast for ``bf16-mixed``; nothing otherwise."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def floating_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------


def enable_checkpointing(model: nn.Module, setting: bool | None) -> bool:
    """Turn on transformers' activation checkpointing when ``setting`` is True, or when it is None and the model
    has more than ~1B parameters. Returns whether it is on.

    Raises:
        InvalidInputError: requested on a model class that does not support it.
    """
    on = setting if setting is not None else sum(p.numel() for p in model.parameters()) > CHECKPOINTING_ABOVE
    if not on:
        return False
    if not getattr(model, "supports_gradient_checkpointing", False):
        if setting is None:
            console.warn(f"{type(model).__name__} does not support activation checkpointing: training without it")
            return False
        raise InvalidInputError(f"--gradient-checkpointing: {type(model).__name__} does not support activation "
                                "checkpointing; pass --no-gradient-checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True


def disable_checkpointing(model: nn.Module) -> None:
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


# --------------------------------------------------------------------------------------------
# LoRA with the sparsity masks held (peft is optional)
# --------------------------------------------------------------------------------------------


def wrap_lora(model: nn.Module, cfg: DistillConfig, masks: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with LoRA adapters on its decoder linears. On a masked (sparse) linear the adapter's update is
    masked too: the layer computes ``x @ (W + M * (B @ A) * scale).T``, so what is trained and evaluated is
    exactly the sparse matrix that :func:`merge_lora` returns (SQFT's SparsePEFT rule)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InvalidInputError("--lora-rank needs peft: pip install 'draftkit[lora]' (or use full fine-tuning)") from None
    names = sorted({name.rsplit(".", 1)[-1] for name in target_linears(model)})
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules=names, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    modules = dict(peft_model.get_base_model().named_modules())
    for name, keep in masks.items():
        if name not in modules:  # a fused expert parameter: no adapter, frozen, its zeros stay
            continue
        layer = modules[name]
        layer.register_buffer("draftkit_keep", keep.to(layer.base_layer.weight.device), persistent=False)
        layer.forward = types.MethodType(_masked_lora_forward, layer)
    return peft_model


def _masked_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.base_layer
    delta = self.get_delta_weight(self.active_adapters[0]) * self.draftkit_keep
    weight = base.weight.to(delta.dtype) + delta
    if not torch.is_autocast_enabled(x.device.type):
        weight = weight.to(x.dtype)
    return nn.functional.linear(x, weight, base.bias)


@torch.no_grad()
def merge_lora(peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Fold the adapters into the base weights (masked where the layer is masked) and drop them."""
    modules = dict(peft_model.get_base_model().named_modules())
    for name, module in modules.items():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "get_delta_weight") or not module.active_adapters:
            continue
        delta = module.get_delta_weight(module.active_adapters[0]).float()
        if name in masks:
            delta = delta * masks[name].to(delta.device)
        base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
    return peft_model.unload()


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def make_optimizer(params: list[nn.Parameter], cfg: DistillConfig) -> tuple[torch.optim.Optimizer, str]:
    """AdamW, fused (one kernel for all parameters) where this torch build and device support it."""
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True), "adamw-fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), "adamw"


class InBackwardAdamW:
    """torchtune's optimizer-in-backward: each parameter's AdamW step runs as soon as its gradient has been
    accumulated in the backward pass, and the gradient is freed at once, so a full set of gradients never
    exists (4 bytes per parameter less in float32). Needs one micro-batch per step and one process.

    The training loop drives ``lr_holder`` (an optimizer over a dummy tensor) with the usual scheduler; each
    parameter's step reads its learning rate from there.
    """

    def __init__(self, params: list[nn.Parameter], cfg: DistillConfig):
        self.lr_holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
        self.optimizers = {p: make_optimizer([p], cfg)[0] for p in params}
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in params]
        self.fused = all(o.defaults.get("fused") for o in self.optimizers.values())

    def _step(self, p: nn.Parameter) -> None:
        opt = self.optimizers[p]
        opt.param_groups[0]["lr"] = self.lr_holder.param_groups[0]["lr"]
        opt.step()
        opt.zero_grad(set_to_none=True)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def state_dict(self) -> dict:
        return {str(i): o.state_dict() for i, o in enumerate(self.optimizers.values())}

    def load_state_dict(self, state: dict) -> None:
        for i, o in enumerate(self.optimizers.values()):
            o.load_state_dict(state[str(i)])
