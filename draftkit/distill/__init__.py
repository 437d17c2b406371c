"""Self-data distillation: the teacher rewrites the SFT set, then the student is fine-tuned on it with its
sparsity masks held fixed (Thangarasa et al. 2024; SD², Lasby et al. 2025).

Python API::

    from draftkit.distill import DistillConfig, distill_model
    cfg = DistillConfig(teacher="examples/tiny/teacher", dataset="train.jsonl", work_dir="run-work")
    model, report = distill_model(student, tokenizer, cfg)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from draftkit.answers import extract_answer
from draftkit.compute import load_dtype
from draftkit.distill.config import DistillConfig, parse_columns
from draftkit.distill.engines import check_vllm
from draftkit.distill.regenerate import ROWS_FILE, HFEngine, load_examples, regenerate
from draftkit.distill.templates import DEFAULT_TEMPLATE, INSTRUCTION_ONLY_TEMPLATE, accept
from draftkit.distill.train import train_model
from draftkit.errors import InvalidInputError

__all__ = [
    "DEFAULT_TEMPLATE",
    "INSTRUCTION_ONLY_TEMPLATE",
    "DistillConfig",
    "HFEngine",
    "accept",
    "check_distill",
    "distill_model",
    "extract_answer",
    "load_examples",
    "parse_columns",
    "regenerate",
    "train_model",
]


def check_distill(hf_config, cfg: DistillConfig) -> None:
    """Fail fast, before the student's weights load: the data must have prompt/response columns, the
    teacher's config must be readable and the vllm engine usable."""
    from draftkit.checkpoint import load_config

    load_examples(cfg)
    if cfg.regenerate and cfg.engine == "vllm":
        check_vllm()
    if cfg.regenerate and cfg.teacher is not None:
        load_config(cfg.teacher, trust_remote_code=cfg.teacher_trust_remote_code)


def distill_model(model, tokenizer, cfg: DistillConfig) -> tuple[Any, dict[str, Any]]:
    """The distill stage: regenerate ``cfg.dataset`` with ``cfg.teacher`` (unless ``cfg.regenerate`` is False),
    then fine-tune ``model`` on it with its sparsity masks held fixed.

    The rows file goes to ``cfg.work_dir/data/rows.jsonl`` and epoch checkpoints to
    ``cfg.work_dir/checkpoints`` (removed once training finishes); re-running with the same ``work_dir``
    resumes both. Without ``work_dir`` a temporary folder is used and removed. Under ``accelerate launch`` /
    ``torchrun`` every process regenerates its share of the rows and trains on its shard of the data.
    """
    from accelerate import PartialState

    examples = load_examples(cfg)  # fails fast on bad data, before the teacher is loaded
    from draftkit.distill.prepare import pin_accelerator_device

    pin_accelerator_device(next(model.parameters()).device)  # before accelerate's state picks its GPU
    state = PartialState(cpu=next(model.parameters()).device.type == "cpu")  # cpu: gloo process groups under torchrun
    temp = cfg.work_dir is None
    if temp and state.num_processes > 1:
        raise InvalidInputError("a multi-process distill needs a work_dir shared by the processes: pass --work-dir")
    work = Path(tempfile.mkdtemp(prefix="draftkit-distill-")) if temp else Path(cfg.work_dir)
    report: dict[str, Any] = {"work_dir": None if temp else str(work), "regenerated": cfg.regenerate}
    try:
        if cfg.regenerate:
            from draftkit.reuse import keep_rows, restore_rows

            # DRAFTKIT_CACHE: rows of the same teacher, data and settings from another run folder
            shared = restore_rows(cfg, work / "data") if state.num_processes == 1 else None
            device = cfg.teacher_device or next(model.parameters()).device
            report["regenerate"] = regenerate(
                cfg, work / "data", device=device, dtype=cfg.teacher_dtype or load_dtype() or "auto",
                trust_remote_code=cfg.teacher_trust_remote_code, processes=state if state.num_processes > 1 else None,
                restart_stale=True,  # the work folder's rows of another teacher or settings are regenerated
            )
            keep_rows(shared, work / "data")
            _free_accelerator_memory()
            rows_cfg = cfg.model_copy(update={"dataset": str(work / "data" / ROWS_FILE), "columns": None, "limit": None})
            examples = load_examples(rows_cfg)
        model, report["train"] = train_model(model, tokenizer, examples, cfg, work / "checkpoints")
        state.wait_for_everyone()
        if state.is_main_process:
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)
    return model, report


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
