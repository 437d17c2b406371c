"""Step 2 of self-data distillation: supervised fine-tuning of the student, sparsity masks held fixed.

A plain training loop on :class:`accelerate.Accelerator`: the same code runs on one CPU, one GPU, or
several processes started with ``accelerate launch`` / ``torchrun``: DDP, or FSDP2, either from an accelerate
config (accelerate routes FSDP on GPUs only; on CPUs it silently falls back to DDP) or from ``fsdp``
(``--fsdp``: draftkit shards the student itself, on any backend, gloo on CPUs included; see
:mod:`draftkit.distill.fsdp`). Loss is on response tokens only, chunked so full float32 logits never exist
(:mod:`draftkit.distill.loss`); precision, activation checkpointing, LoRA and the optimizer are set up by
:mod:`draftkit.distill.prepare`.

Masks: every decoder linear that has exact zeros when training starts (a sparsified student) is
re-multiplied by its keep-mask after each optimizer step (under FSDP each rank its shard), so a weight that
was zero stays exactly zero; with LoRA the adapter's update is masked inside the forward pass and when
merged. The report's ``zero_positions_changed`` compares the zero positions before training with the
weights returned (under FSDP both gathered whole; the returned model is a plain, unsharded copy on the CPU).

Training stops with :class:`TrainingDivergedError` as soon as the loss or a weight is NaN/Inf.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from draftkit import console
from draftkit.atomic import atomic_write_json
from draftkit.distill.config import DistillConfig
from draftkit.distill.estimate import batch_shape, estimate_training
from draftkit.distill.fsdp import MaskHold, check_fsdp, gather_full_model, is_sharded, shard_for_fsdp
from draftkit.distill.loss import IGNORE, LossModule, collate, response_loss, tokenize_example
from draftkit.distill.prepare import (
    InBackwardAdamW,
    autocast,
    disable_checkpointing,
    enable_checkpointing,
    make_optimizer,
    merge_lora,
    pin_accelerator_device,
    resolve_precision,
    set_precision,
    wrap_lora,
)
from draftkit.distill.rows import Example
from draftkit.errors import DataError, DraftkitError, InvalidInputError
from draftkit.input_errors import reading
from draftkit.memory import gb
from draftkit.sparsify.masks import extract_masks, masked_weight
from draftkit.textcap import TextCap

__all__ = ["IGNORE", "MASK_MIN_SPARSITY", "TrainingDivergedError", "collate", "response_loss", "tokenize_example",
           "train_model", "train_sequences"]


MASK_MIN_SPARSITY = 0.01


class TrainingDivergedError(DraftkitError):
    """The loss or a weight became NaN/Inf; nothing is saved as the stage's output."""


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def student_identity(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the student's weights and buffers: a checkpoint made
    from another student (another pruning, sparsity, or model of the same shapes) is never resumed."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.device.type != "meta" and t.numel():
            h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def _fingerprint(cfg: DistillConfig, data_key: str, student: str, world: int) -> str:
    keys = ("epochs", "max_steps", "lr", "lr_schedule", "warmup", "weight_decay", "train_batch_size", "grad_accum",
            "max_length", "lora_rank", "lora_alpha", "eval_fraction", "seed", "precision", "optimizer_in_backward")
    data = {k: getattr(cfg, k) for k in keys}
    data["examples"] = data_key
    data["student"] = student
    data["processes"] = world
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def _eval_loss(lm: nn.Module, loader, accelerator, amp) -> float | None:
    if loader is None:
        return None
    lm.eval()
    total, n = 0.0, 0
    for batch in loader:
        with amp():
            loss = lm(**batch)
        total += float(accelerator.gather(loss.detach()[None]).mean())
        n += 1
    lm.train()
    return round(total / max(n, 1), 5)


def _split(encoded: list, cfg: DistillConfig) -> tuple[list, list]:
    """(eval, train): a held-out slice chosen by the seed."""
    order = list(range(len(encoded)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = int(len(encoded) * cfg.eval_fraction)
    if cfg.eval_fraction > 0 and n_eval == 0 and len(encoded) >= 10:
        n_eval = 1
    return [encoded[i] for i in order[:n_eval]], [encoded[i] for i in order[n_eval:]]


def _diverged(what: str, value: str, step: int, cfg: DistillConfig, ckpt_root: Path | None) -> TrainingDivergedError:
    kept = sorted(ckpt_root.glob("epoch-*")) if ckpt_root is not None and ckpt_root.is_dir() else []
    where = f"; the last good checkpoint is kept in {kept[-1]}" if kept else ""
    return TrainingDivergedError(f"training diverged at step {step}: {what} became {value} (lr {cfg.lr:g}); "
                                 f"nothing was saved{where}; lower --lr (or use --precision fp32)")


def _first_nonfinite(model: nn.Module) -> tuple[str, str] | None:
    """The first trainable weight holding NaN/Inf, or None. One fused norm over all weights per call (a NaN or
    Inf anywhere makes it non-finite); the per-weight search runs only when it is."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or torch.isfinite(torch.nn.utils.get_total_norm(params, foreach=True)):
        return None
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            return f"weight {name}", "NaN" if torch.isnan(p).any() else "Inf"
    return "the weights' norm", "Inf"


def train_model(model: nn.Module, tokenizer, examples: list[Example], cfg: DistillConfig,
                checkpoint_dir: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune ``model`` on ``examples`` (prompt -> ``reference`` as the response), masks held fixed.

    Returns the trained model (LoRA merged, parameters in their original dtype) and a report with losses,
    steps, throughput and the mask check.

    Raises:
        TrainingDivergedError: the loss or a weight became NaN/Inf (epoch checkpoints already written stay).
    """
    if not examples:
        raise DataError("no training examples")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    cap = TextCap(tokenizer, cfg.max_length, str(cfg.dataset or "the training rows"))
    encoded = [tokenize_example(tokenizer, e.prompt, e.reference, cfg.max_length, cap) for e in examples]
    cap.report()
    encoded = [e for e in encoded if any(t != IGNORE for t in e["labels"][1:])]
    if not encoded:
        raise DataError(f"every example is longer than max_length={cfg.max_length} before its response: raise --max-length")
    data_key = hashlib.sha256("".join(e.id + e.reference for e in examples).encode()).hexdigest()
    return train_sequences(model, encoded, pad, cfg, checkpoint_dir, data_key=data_key)


def train_sequences(model: nn.Module, encoded: list[dict[str, list[int]]], pad: int, cfg: DistillConfig,
                    checkpoint_dir: str | Path | None = None, *, data_key: str = "") -> tuple[nn.Module, dict[str, Any]]:
    """The training loop on tokenized sequences (``input_ids`` and ``labels``, -100 where no loss is wanted)."""
    from accelerate import Accelerator, DistributedType
    from transformers import get_scheduler

    t0 = time.perf_counter()
    device = next(model.parameters()).device
    pin_accelerator_device(device)
    accelerator = Accelerator(cpu=device.type == "cpu", gradient_accumulation_steps=cfg.grad_accum)
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    if cfg.optimizer_in_backward and accelerator.num_processes > 1:
        raise InvalidInputError("optimizer_in_backward works in one process only: drop it for a multi-process run")
    lora = cfg.lora_rank > 0
    # fsdp: draftkit shards the student itself (any backend); an FSDP accelerate config (GPUs) has accelerate do it
    own_fsdp = cfg.fsdp and accelerator.distributed_type != DistributedType.FSDP
    check_fsdp(accelerator, lora=lora, own=own_fsdp)

    # keep-masks from the weights before training, of the linears at least 1% zero (a dense checkpoint's few
    # stray exact zeros are not a sparsity pattern worth a byte per weight of mask)
    student = student_identity(model) if checkpoint_dir and cfg.checkpoints else ""
    masks = extract_masks(model, min_sparsity=MASK_MIN_SPARSITY)
    zeros_before = sum(int((~m).sum()) for m in masks.values())
    if masks:
        console.info(f"holding the sparsity masks of {len(masks)} linear layers fixed ({zeros_before} zeros)")

    eval_set, train_set = _split(encoded, cfg)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)

    def make_loader(data, shuffle):
        return torch.utils.data.DataLoader(data, batch_size=cfg.train_batch_size, shuffle=shuffle, generator=shuffle_gen,
                                           collate_fn=lambda b: collate(b, pad))

    world = accelerator.num_processes
    if world > 1 and len(train_set) < world * cfg.train_batch_size:
        raise InvalidInputError(f"{world} processes need at least {world * cfg.train_batch_size} training rows "
                                f"(--train-batch-size {cfg.train_batch_size} each); there are {len(train_set)}: "
                                "use fewer processes, a smaller --train-batch-size or more data")
    train_loader = make_loader(train_set, True)
    eval_loader = make_loader(eval_set, False) if eval_set else None

    precision = resolve_precision(cfg.precision, device)
    checkpointing = enable_checkpointing(model, cfg.gradient_checkpointing)
    if lora:
        model = wrap_lora(model, cfg, masks)
    restore_dtypes = set_precision(model, precision, trainable_only=lora and precision == "bf16-mixed")
    model.train()
    lm = LossModule(model, loss_fn=lambda m, b: response_loss(m, b, cfg.loss_chunk_size))
    if own_fsdp:
        shard_for_fsdp(lm)  # before the optimizer: it steps on the shards
    params = [p for p in model.parameters() if p.requires_grad]
    batch_tokens, longest = batch_shape(train_set, cfg.train_batch_size)
    estimate = estimate_training(model, tokens=batch_tokens, seqlen=longest, precision=precision, checkpointing=checkpointing,
                                 optimizer_in_backward=cfg.optimizer_in_backward, loss_chunk=cfg.loss_chunk_size)
    if accelerator.is_main_process:
        console.info(f"{estimate.line()}; training")
    in_backward = InBackwardAdamW(params, cfg) if cfg.optimizer_in_backward else None
    if in_backward is not None:
        optimizer, optimizer_name = in_backward.lr_holder, "adamw-fused-in-backward" if in_backward.fused else "adamw-in-backward"
        accelerator.register_for_checkpointing(in_backward)
    else:
        optimizer, optimizer_name = make_optimizer(params, cfg)
    if own_fsdp:  # sharded already: accelerate (whose type is MULTI_CPU/GPU here) would wrap it in DDP
        optimizer, train_loader = accelerator.prepare(optimizer, train_loader)
    else:
        lm, optimizer, train_loader = accelerator.prepare(lm, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_schedule]
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=int(cfg.warmup * total_steps) * accelerator.num_processes,
                              num_training_steps=total_steps * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)

    # ---- resume from the last epoch checkpoint with the same settings and data ----
    fingerprint = _fingerprint(cfg, data_key, student, accelerator.num_processes)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir and cfg.checkpoints else None
    if own_fsdp and ckpt_root is not None:
        console.warn("--fsdp: no epoch checkpoints (accelerate saves FSDP state only from an FSDP accelerate config)")
        ckpt_root = None
    start_epoch, step = 0, 0
    history: list[dict[str, Any]] = []
    if ckpt_root is not None:
        start_epoch, step, history = _resume(ckpt_root, fingerprint, student, accelerator)

    def amp():
        return autocast(precision, device)

    hold = MaskHold(masks)

    def hold_masks():
        if masks and not lora:
            hold(accelerator.unwrap_model(lm).model)

    eval_before = _eval_loss(lm, eval_loader, accelerator, amp) if start_epoch == 0 else None
    losses: list[float] = []
    tokens, t_train = 0, time.perf_counter()
    with console.status_bar("training", total=total_steps) as bar:
        bar.update(step, None)
        for epoch in range(start_epoch, n_epochs):
            if step >= total_steps:
                break
            epoch_losses: list[float] = []
            shuffle_gen.manual_seed(cfg.seed + epoch)  # each epoch's order depends on (seed, epoch) only: resumable
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            for batch in train_loader:
                with accelerator.accumulate(lm):
                    with amp():
                        loss = lm(**batch)
                    if not torch.isfinite(loss.detach()):
                        raise _diverged("the loss", "NaN" if torch.isnan(loss.detach()) else "Inf", step + 1, cfg, ckpt_root)
                    accelerator.backward(loss * _token_share(batch, accelerator) if world > 1 else loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                epoch_losses.append(float(loss.detach()))
                tokens += int(batch["attention_mask"].sum())
                if accelerator.sync_gradients:
                    hold_masks()
                    step += 1
                    bad = _first_nonfinite(lm)
                    if bad is not None:
                        raise _diverged(*bad, step, cfg, ckpt_root)
                    bar.update(1, f"loss {sum(epoch_losses[-cfg.grad_accum:]) / min(cfg.grad_accum, len(epoch_losses)):.4f}")
                    if step >= total_steps:
                        break
            losses.extend(epoch_losses)
            record = {"epoch": epoch + 1, "step": step, "train_loss": round(sum(epoch_losses) / max(len(epoch_losses), 1), 5),
                      "eval_loss": _eval_loss(lm, eval_loader, accelerator, amp)}
            history.append(record)
            if record["eval_loss"] is not None and not math.isfinite(record["eval_loss"]):
                raise _diverged("the eval loss", str(record["eval_loss"]), step, cfg, ckpt_root)
            console.info(f"epoch {epoch + 1}: train loss {record['train_loss']}, eval loss {record['eval_loss']}")
            if ckpt_root is not None and step < total_steps:
                _save_checkpoint(ckpt_root, epoch + 1, step, history, {"fingerprint": fingerprint, "student": student},
                                 accelerator)
    train_seconds = time.perf_counter() - t_train
    if in_backward is not None:
        in_backward.remove()

    model = accelerator.unwrap_model(lm).model
    if is_sharded(model):
        model = gather_full_model(model)
    if checkpointing:
        disable_checkpointing(model)
    if lora:
        model = merge_lora(model, masks)  # masked deltas: exactly the weights the training forward used
    restore_dtypes(model)
    model.eval()
    changed = _changed_zeros(model, masks)
    k = max(1, min(10, len(losses) // 5))
    report = {
        "examples": len(encoded),
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "mode": f"lora-r{cfg.lora_rank}" if lora else "full",
        "precision": precision,
        "gradient_checkpointing": checkpointing,
        "optimizer": optimizer_name,
        "steps": step,
        "epochs": round(step / steps_per_epoch, 3),
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / train_seconds, 2) if train_seconds > 0 else None,
        "train_loss_first": round(sum(losses[:k]) / k, 5) if losses else None,
        "train_loss_last": round(sum(losses[-k:]) / k, 5) if losses else None,
        "eval_loss_before": eval_before,
        "eval_loss_after": history[-1]["eval_loss"] if history else None,
        "history": history,
        "masked_modules": len(masks),
        "masked_zeros": zeros_before,
        "zero_positions_changed": changed,
        "seconds": round(time.perf_counter() - t0, 2),
        "processes": accelerator.num_processes,
        "memory_estimate_gb": {"host": gb(estimate.host), "device": gb(estimate.device),
                               **{k: gb(v) for k, v in estimate.parts.items()}},
    }
    return model, report


def _token_share(batch: dict[str, torch.Tensor], accelerator) -> torch.Tensor:
    """This process's share of the step's response tokens x the number of processes: DDP averages the
    processes' gradients, so scaling each process's mean loss by it makes the step the mean over all the
    step's response tokens, as one process with the whole batch computes it."""
    n = (batch["labels"][:, 1:] != IGNORE).sum().float()
    total = accelerator.reduce(n.clone(), reduction="sum")
    return n * accelerator.num_processes / total.clamp(min=1)


def _changed_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Positions that were zero before training (``~mask``, taken from the weights then) and are not now."""
    weights = {n: masked_weight(model, n) for n in masks}
    return sum(int(((weights[n] != 0) & ~m.to(weights[n].device)).sum()) for n, m in masks.items())


def _save_checkpoint(root: Path, epoch: int, step: int, history, keys: dict[str, str], accelerator) -> None:
    path = root / f"epoch-{epoch}"
    tmp = root / f".epoch-{epoch}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer.json", {"epoch": epoch, "step": step, "history": history, **keys})
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in root.glob("epoch-*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume(root: Path, fingerprint: str, student: str, accelerator) -> tuple[int, int, list]:
    found = []
    for d in root.glob("epoch-*"):
        try:
            info = json.loads((d / "trainer.json").read_text())
        except (OSError, json.JSONDecodeError, RecursionError):
            continue
        if isinstance(info, dict) and all(isinstance(info.get(k), int) for k in ("epoch", "step")):  # else unreadable
            found.append((info["epoch"], d, info))
    if not found:
        return 0, 0, []
    epoch, path, info = max(found, key=lambda x: x[0])
    if info.get("fingerprint") != fingerprint:
        why = ("an older draftkit" if "student" not in info else "another student (its weights differ)"
               if info["student"] != student else "other settings or data")
        console.warn(f"ignoring checkpoint {path}: it was made from {why}; training starts afresh")
        return 0, 0, []
    with reading(path, "training checkpoint", f"delete {path} to train afresh (or rerun with --overwrite)"):
        accelerator.load_state(str(path))
    console.info(f"resuming training from {path} (epoch {epoch}, step {info['step']})")
    return epoch, info["step"], info.get("history", [])
