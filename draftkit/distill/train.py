"""Step 2 of self-data distillation: supervised fine-tuning of the student, sparsity masks held fixed.

A plain training loop on :class:`accelerate.Accelerator`: the same code runs on one CPU, one GPU, or
several GPUs when started with ``accelerate launch`` / ``torchrun`` (data parallel; each process holds the
model). Loss is on response tokens only; prompts are rendered with the *student's* chat template.

Masks: every decoder linear that has exact zeros when training starts (a sparsified student) is
re-multiplied by its keep-mask after each optimizer step, so a weight that was zero stays exactly zero;
with LoRA the base weights are frozen and the merged weights are masked again. Pruned layers are simply
absent from the student, so they stay pruned.
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
from draftkit.data import render_chat
from draftkit.distill.config import DistillConfig
from draftkit.distill.regenerate import Example, has_chat_template
from draftkit.errors import DataError, InvalidInputError
from draftkit.io import atomic_write_json
from draftkit.sparsify.masks import apply_masks, extract_masks, target_linears

IGNORE = -100


# --------------------------------------------------------------------------------------------
# Tokenization with response-only labels
# --------------------------------------------------------------------------------------------


def tokenize_example(tokenizer, prompt: list[dict[str, str]], response: str, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` of prompt + response in the chat template, and ``labels`` that are -100 on the prompt.

    The prompt (with the generation prompt, e.g. ``<|assistant|>\\n``) and the rest of the rendered
    conversation (the response and the template's end-of-turn) are tokenized separately, so the boundary is
    exact. Without a chat template the plain ``User:/Assistant:`` form is used and EOS closes the response.
    """
    chat = has_chat_template(tokenizer)
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    if chat:
        full = render_chat(tokenizer, [*prompt, {"role": "assistant", "content": response}])
        if not full.startswith(prompt_text):
            raise InvalidInputError("the student's chat template renders the prompt differently with a response; "
                                    "cannot tell prompt tokens from response tokens")
        rest = full[len(prompt_text):]
    else:
        prompt_text += " "
        rest = response
    p_ids = tokenizer(prompt_text, add_special_tokens=not chat)["input_ids"]
    r_ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
    if not chat and tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]
    ids = (p_ids + r_ids)[:max_length]
    labels = ([IGNORE] * len(p_ids) + r_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the next token over positions whose label is not -100."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                       ignore_index=IGNORE)


# --------------------------------------------------------------------------------------------
# LoRA (peft is optional)
# --------------------------------------------------------------------------------------------


def _wrap_lora(model: nn.Module, cfg: DistillConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InvalidInputError("--lora-rank needs peft: pip install 'draftkit[lora]' (or use full fine-tuning)") from None
    names = sorted({name.rsplit(".", 1)[-1] for name in target_linears(model)})
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules=names, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _fingerprint(cfg: DistillConfig, examples: list[Example], model: nn.Module) -> str:
    keys = ("epochs", "max_steps", "lr", "lr_schedule", "warmup", "weight_decay", "train_batch_size", "grad_accum",
            "max_length", "lora_rank", "lora_alpha", "eval_fraction", "seed")
    data = {k: getattr(cfg, k) for k in keys}
    data["examples"] = hashlib.sha256("".join(e.id + e.reference for e in examples).encode()).hexdigest()
    data["params"] = sum(p.numel() for p in model.parameters())
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def _eval_loss(model: nn.Module, loader, accelerator) -> float | None:
    if loader is None:
        return None
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        loss = response_loss(model, batch)
        total += float(accelerator.gather(loss.detach()[None]).mean())
        n += 1
    model.train()
    return round(total / max(n, 1), 5)


def train_model(model: nn.Module, tokenizer, examples: list[Example], cfg: DistillConfig,
                checkpoint_dir: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune ``model`` on ``examples`` (prompt -> ``reference`` as the response), masks held fixed.

    Returns the trained model (LoRA merged) and a report with losses, steps and mask checks.
    """
    from accelerate import Accelerator
    from transformers import get_scheduler

    if not examples:
        raise DataError("no training examples")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    accelerator = Accelerator(cpu=device.type == "cpu", gradient_accumulation_steps=cfg.grad_accum)
    torch.manual_seed(cfg.seed)

    masks = extract_masks(model)
    zeros_before = sum(int((~m).sum()) for m in masks.values())
    if masks:
        console.info(f"holding the sparsity masks of {len(masks)} linear layers fixed ({zeros_before} zeros)")

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    encoded = [tokenize_example(tokenizer, e.prompt, e.reference, cfg.max_length) for e in examples]
    encoded = [e for e in encoded if any(t != IGNORE for t in e["labels"][1:])]
    if not encoded:
        raise DataError(f"every example is longer than max_length={cfg.max_length} before its response: raise --max-length")
    rng = random.Random(cfg.seed)
    order = list(range(len(encoded)))
    rng.shuffle(order)
    n_eval = int(len(encoded) * cfg.eval_fraction)
    if cfg.eval_fraction > 0 and n_eval == 0 and len(encoded) >= 10:
        n_eval = 1
    eval_set = [encoded[i] for i in order[:n_eval]]
    train_set = [encoded[i] for i in order[n_eval:]]

    shuffle_gen = torch.Generator().manual_seed(cfg.seed)

    def make_loader(data, shuffle):
        return torch.utils.data.DataLoader(data, batch_size=cfg.train_batch_size, shuffle=shuffle, generator=shuffle_gen,
                                           collate_fn=lambda b: collate(b, pad))

    train_loader = make_loader(train_set, True)
    eval_loader = make_loader(eval_set, False) if eval_set else None

    lora = cfg.lora_rank > 0
    if lora:
        model = _wrap_lora(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
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
    fingerprint = _fingerprint(cfg, examples, accelerator.unwrap_model(model))
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir and cfg.checkpoints else None
    start_epoch, step = 0, 0
    history: list[dict[str, Any]] = []
    if ckpt_root is not None:
        start_epoch, step, history = _resume(ckpt_root, fingerprint, accelerator)

    def hold_masks():
        if masks and not lora:
            apply_masks(accelerator.unwrap_model(model), masks)

    eval_before = _eval_loss(model, eval_loader, accelerator) if start_epoch == 0 else None
    losses: list[float] = []
    tokens = 0
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
                with accelerator.accumulate(model):
                    loss = response_loss(model, batch)
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                epoch_losses.append(float(loss.detach()))
                tokens += int(batch["attention_mask"].sum())
                if accelerator.sync_gradients:
                    hold_masks()
                    step += 1
                    bar.update(1, f"loss {sum(epoch_losses[-cfg.grad_accum:]) / min(cfg.grad_accum, len(epoch_losses)):.4f}")
                    if step >= total_steps:
                        break
            losses.extend(epoch_losses)
            record = {"epoch": epoch + 1, "step": step, "train_loss": round(sum(epoch_losses) / max(len(epoch_losses), 1), 5),
                      "eval_loss": _eval_loss(model, eval_loader, accelerator)}
            history.append(record)
            console.info(f"epoch {epoch + 1}: train loss {record['train_loss']}, eval loss {record['eval_loss']}")
            if ckpt_root is not None and step < total_steps:
                _save_checkpoint(ckpt_root, epoch + 1, step, history, fingerprint, accelerator)

    model = accelerator.unwrap_model(model)
    if lora:
        model = model.merge_and_unload()
    if masks:
        apply_masks(model, masks)  # exact zeros again (a no-op for full fine-tuning; re-masks a merged LoRA)
    model.eval()
    zeros_after = sum(int((~m).sum()) for m in masks.values())
    changed = _changed_zeros(model, masks)
    k = max(1, min(10, len(losses) // 5))
    report = {
        "examples": len(encoded),
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "mode": f"lora-r{cfg.lora_rank}" if lora else "full",
        "steps": step,
        "epochs": round(step / steps_per_epoch, 3),
        "tokens_seen": tokens,
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
    }
    assert zeros_after == zeros_before
    return model, report


def _changed_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    modules = dict(model.named_modules())
    return sum(int(((modules[n].weight != 0) != m.to(modules[n].weight.device)).sum()) for n, m in masks.items())


def _save_checkpoint(root: Path, epoch: int, step: int, history, fingerprint: str, accelerator) -> None:
    path = root / f"epoch-{epoch}"
    tmp = root / f".epoch-{epoch}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer.json", {"epoch": epoch, "step": step, "history": history, "fingerprint": fingerprint})
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in root.glob("epoch-*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume(root: Path, fingerprint: str, accelerator) -> tuple[int, int, list]:
    found = []
    for d in root.glob("epoch-*"):
        try:
            info = json.loads((d / "trainer.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found.append((info["epoch"], d, info))
    if not found:
        return 0, 0, []
    epoch, path, info = max(found, key=lambda x: x[0])
    if info.get("fingerprint") != fingerprint:
        console.warn(f"ignoring checkpoint {path}: it was made with other settings or data")
        return 0, 0, []
    accelerator.load_state(str(path))
    console.info(f"resuming training from {path} (epoch {epoch}, step {info['step']})")
    return epoch, info["step"], info.get("history", [])
