"""The distill stage's settings: one flat schema for recipes, the Python API and ``draftkit distill``.

Field names are the CLI option names (``max_new_tokens`` -> ``--max-new-tokens``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from draftkit.distill.templates import DEFAULT_TEMPLATE, check_template, resolve_template


class DistillConfig(BaseModel):
    """Self-data distillation: the teacher rewrites the SFT set, then the student is fine-tuned on it
    with its sparsity masks held fixed."""

    model_config = ConfigDict(extra="forbid")

    # ---- data --------------------------------------------------------------------------------
    dataset: str | None = Field(
        None,
        description="SFT data: local .jsonl/.json/.parquet/.csv or hub dataset id owner/name[:config]; "
        "a rows.jsonl written by `distill regenerate` is read as is (its chosen responses)",
    )
    split: str = Field("train", description="dataset split for hub datasets")
    columns: str | None = Field(
        None,
        description="column mapping when it cannot be guessed: 'prompt=COL[,COL],response=COL' or 'messages=COL'",
    )
    limit: int | None = Field(None, ge=1, description="use only the first N rows of the dataset")

    # ---- regeneration ------------------------------------------------------------------------
    regenerate: bool = Field(
        True, description="let the teacher rewrite the responses; False trains on the original ones (plain SFT)"
    )
    teacher: str | None = Field(None, description="teacher model (directory, .gguf file, alias or hub id) that rewrites the responses")
    template: str = Field(
        DEFAULT_TEMPLATE,
        description="prompt given to the teacher: 'default' or 'instruction-only' (the shipped templates), a file "
        "holding one, or the text itself; {instruction} and {reference} are replaced by the row's instruction and "
        "reference response",
    )
    max_new_tokens: int = Field(256, ge=1, description="longest teacher response, in tokens")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature; 0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling threshold (with temperature > 0)")
    batch_size: int = Field(32, ge=1, description="rows generated together (the largest batch in flight)")
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: draftkit's batched decoder on transformers; vllm: vLLM's offline LLM API (extra)"
    )
    tensor_parallel: int = Field(1, ge=1, description="GPUs the vllm engine shards the teacher over")
    max_model_len: int | None = Field(
        None, ge=16, description="vllm: longest prompt + response the engine plans for (default: the model's own)"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="vllm: fraction of each GPU's memory the engine may take"
    )
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="the teacher's weights dtype (hf and vllm engines; default: the teacher checkpoint's own)"
    )
    teacher_trust_remote_code: bool = Field(
        False, description="allow code from the teacher's repository to run (set by --trust-remote-code)"
    )
    teacher_device: str | None = Field(
        None, description="hf engine: device of the teacher (default: the student's; each process's own under accelerate)"
    )
    accept_filter: bool = Field(
        True,
        description="keep a teacher response only if it finished, its final answer matches the reference's and it "
        "does not talk about the reference (rejected rows keep the original response); false keeps every non-empty "
        "response whatever its final answer: use false for a draft (alignment with the teacher is the goal, and a "
        "small teacher is rarely right), true to recover a pruned model's quality",
    )
    work_dir: str | None = Field(
        None,
        description="folder for rows.jsonl (regenerated data) and training checkpoints; re-running with the "
        "same folder resumes; default: OUT-work beside the output (`draftkit distill`), NN-distill.work in a "
        "recipe run, a temporary folder from Python",
    )

    # ---- training ----------------------------------------------------------------------------
    epochs: float = Field(1.0, gt=0, description="passes over the data (fractions allowed)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    lr: float = Field(2e-5, gt=0, description="peak learning rate")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    warmup: float = Field(0.03, ge=0, lt=1, description="fraction of the steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    train_batch_size: int = Field(8, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_length: int = Field(1024, ge=8, description="longest training sequence in tokens (longer ones are cut)")
    lora_rank: int = Field(0, ge=0, description="0: full fine-tuning; >0: LoRA of this rank (needs peft), merged at the end")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; default 2 x rank")
    eval_fraction: float = Field(0.02, ge=0, lt=0.5, description="held-out slice of the data for eval loss")
    seed: int = Field(0, description="seed for shuffling, the held-out slice, LoRA init and sampling")
    checkpoints: bool = Field(True, description="save a checkpoint each epoch in work_dir and resume from the last one")
    precision: Literal["auto", "bf16-mixed", "fp32", "bf16-true"] = Field(
        "auto",
        description="auto: bf16-mixed on a GPU, fp32 on a CPU; bf16-mixed: float32 master weights and AdamW state, "
        "bfloat16 autocast compute; fp32: float32 throughout; bf16-true: bfloat16 weights and AdamW state "
        "(least memory, but small updates are rounded away)",
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="recompute activations in the backward pass instead of keeping them (less memory, ~30% more "
        "compute); default: on above ~1B parameters",
    )
    optimizer_in_backward: bool = Field(
        False,
        description="run each weight's AdamW step in the backward pass as soon as its gradient is ready and free the "
        "gradient (torchtune's optimizer-in-backward: 4 bytes per parameter less in float32); needs grad_accum 1 "
        "and one process",
    )
    fsdp: bool = Field(
        False,
        description="shard the student's weights, gradients and AdamW state over the processes (FSDP2, each decoder "
        "layer one unit) under torchrun/accelerate launch, on any backend (gloo on CPUs too); an FSDP accelerate "
        "config does the same on GPUs; full fine-tuning only",
    )
    loss_chunk_size: int = Field(
        512, ge=1, description="response tokens whose logits are computed at once in the loss (less memory when smaller)"
    )

    @field_validator("template", mode="before")
    @classmethod
    def _template_by_name_or_file(cls, v):
        """``default`` and ``instruction-only`` name the shipped templates; a path names a template file."""
        return resolve_template(v)

    @field_validator("template")
    @classmethod
    def _template_has_instruction(cls, v: str) -> str:
        check_template(v)
        return v

    @field_validator("columns")
    @classmethod
    def _columns_syntax(cls, v: str | None) -> str | None:
        if v is not None:
            parse_columns(v)
        return v

    @model_validator(mode="after")
    def _needs(self):
        if self.dataset is None:
            raise ValueError("dataset is required (the SFT data to distill)")
        if self.optimizer_in_backward and self.grad_accum > 1:
            raise ValueError("optimizer_in_backward steps each weight during the backward pass, so it cannot "
                             "accumulate gradients: set grad_accum 1 or optimizer_in_backward false")
        if self.fsdp and (self.lora_rank or self.optimizer_in_backward):
            raise ValueError("fsdp trains the full weights with a sharded AdamW: drop lora_rank and optimizer_in_backward "
                             "(or fsdp)")
        if self.regenerate and self.teacher is None:
            raise ValueError("teacher is required to regenerate the data (or set regenerate false to train on it as is)")
        return self

    def column_map(self) -> dict[str, str] | None:
        return parse_columns(self.columns) if self.columns else None


COLUMNS_SYNTAX = "--columns prompt=COL[,COL],response=COL  (or messages=COL)"


def parse_columns(spec: str) -> dict[str, str]:
    """``"prompt=question,response=answer"`` -> ``{"prompt": "question", "response": "answer"}``.

    Commas separate both pairs and several prompt columns: ``prompt=instruction,input,response=output``.
    """
    out: dict[str, str] = {}
    key = None
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if "=" in part:
            key, _, val = part.partition("=")
            key, val = key.strip(), val.strip()
            if key not in ("prompt", "response", "messages") or not val:
                raise ValueError(f"bad column mapping {part!r}: use {COLUMNS_SYNTAX}")
            out[key] = val
        elif key == "prompt":
            out["prompt"] += "," + part
        else:
            raise ValueError(f"bad column mapping {spec!r}: use {COLUMNS_SYNTAX}")
    if "messages" not in out and not ("prompt" in out and "response" in out):
        raise ValueError(f"bad column mapping {spec!r}: use {COLUMNS_SYNTAX}")
    return out


def references(config: dict) -> tuple[tuple[str, str], ...]:
    """The other models and data a distill config names, for its fingerprint and input checks
    (:mod:`draftkit.registry`): the teacher only when it regenerates, the dataset, and an inline template."""
    refs: tuple[tuple[str, str], ...] = (("dataset", "data"),)
    if config.get("regenerate") is not False:
        refs = (("teacher", "model"), *refs)
    if isinstance(config.get("template"), str):
        refs += (("template", "text"),)
    return refs
