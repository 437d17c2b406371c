"""The stage runner: each stage is a function ``(model, tokenizer, config) -> (model, report)``, registered in
:mod:`draftkit.registry` (``stages`` is re-exported here).

Commands (:func:`run_stage`) and the recipe pipeline both go through :func:`run_stage_on`, so
``draftkit prune`` and a recipe's ``prune:`` step are the same code with the same settings: the same
streaming rule, memory estimate, "cannot fit" check and work-folder lock.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from draftkit.atomic import atomic_dir, atomic_write_json, check_output_dir, config_paths
from draftkit.checkpoint import (
    check_device,
    check_finite,
    load_model_and_tokenizer,
    load_tokenizer,
    write_model,
)
from draftkit.checkpoint.facts import read_facts
from draftkit.compute import ComputeChoice, cast_for_compute, computing
from draftkit.compute import current as current_compute
from draftkit.errors import GateFailedError, InvalidInputError
from draftkit.memory import estimate_line, heavy_work_starts
from draftkit.provenance import PROVENANCE_FILE, make_provenance
from draftkit.registry import Stage, stages
from draftkit.registry import stage as registered
from draftkit.threads import apply_threads


class LoadConfig(BaseModel):
    """How models are loaded."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto keeps the checkpoint's own"
    )
    compute: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype the forwards run in (calibration, scoring, regeneration, eval, spec) apart from the "
        "saved weights' dtype; auto: bfloat16 where the device runs it fast (CUDA with bf16, a CPU with AMX or "
        "AVX512-BF16, MPS), else float32",
        json_schema_extra={"option": "compute-dtype"},
    )
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps")
    trust_remote_code: bool = Field(False, description="allow code from the model repository to run")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (default: the free cores, i.e. cores minus those other processes keep busy, at least 1)"
    )
    stream: Literal["auto", "on", "off"] = Field(
        "auto",
        description="prune/sparsify/eval --ppl: read one decoder layer at a time from the safetensors shards (prune "
        "and sparsify write the output shard by shard; auto: checkpoints above 0.75 GB, or when the whole model "
        "would not fit)",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        try:
            return check_device(v)
        except InvalidInputError as exc:
            raise ValueError(str(exc)) from None


def stage_compute(name: str, load: LoadConfig) -> ComputeChoice | None:
    """The compute dtype stage ``name`` runs its forwards in (:mod:`draftkit.compute`); None for a stage that
    runs none (``computes`` False in :mod:`draftkit.registry`). The choice and why are printed on the estimate line, once the heavy work starts (so bad
    input found before then is still a single line)."""
    from draftkit.checkpoint import resolve_device
    from draftkit.compute import resolve_compute
    from draftkit.memory import announce_compute

    entry = registered(name)
    if entry is not None and not entry.computes:
        return None
    choice = resolve_compute(load.compute, resolve_device(load.device), stage=name)
    announce_compute(f"{name}: {choice.line()}")
    return choice


def trusting(cfg: BaseModel, load: LoadConfig) -> BaseModel:
    """``cfg`` with --trust-remote-code (``load.trust_remote_code``) covering the other models the stage loads:
    distill's teacher, eval's baseline, spec's and export's target (as preflight checks them). Never set otherwise."""
    if not load.trust_remote_code:
        return cfg
    if "teacher_trust_remote_code" in type(cfg).model_fields:
        return cfg.model_copy(update={"teacher_trust_remote_code": True})
    if hasattr(cfg, "_trust_remote_code"):
        cfg = cfg.model_copy()
        cfg._trust_remote_code = True
    return cfg


@dataclass
class Held:
    """A model in memory and the saved folder it equals: a recipe hands it to its next stage instead of
    reading that folder again (only while :func:`draftkit.memory.fits_comfortably` says so)."""

    model: Any
    tokenizer: Any
    path: str

    def release(self) -> None:
        """Drop the model (the next stage reads its folder from disk, streamed when its rule says so)."""
        from draftkit.memory import collect_released_models

        self.model = self.tokenizer = None
        collect_released_models()


@dataclass
class StageRun:
    model: Any  # the stage's model in memory after it ran, None when it streamed from the shards
    tokenizer: Any
    report: dict[str, Any]


def run_stage(
    name: str,
    model_name: str,
    cfg: BaseModel,
    *,
    out: str | Path,
    load: LoadConfig | None = None,
    overwrite: bool = False,
    arguments: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load ``model_name``, run stage ``name`` with ``cfg``, write the result to ``out`` atomically.

    The output and the stage's settings are checked before the weights load, so bad input costs
    little and writes nothing. Returns the stage's report (with ``output`` and ``total_seconds``).

    Raises:
        GateFailedError: after the outputs are written, when the report's ``gate`` failed.
    """
    report = run_stage_on(name, model_name, cfg, out=out, load=load, overwrite=overwrite, arguments=arguments).report
    raise_if_gate_failed(report)
    return report


def run_stage_on(
    name: str,
    model_name: str,
    cfg: BaseModel,
    *,
    out: str | Path,
    load: LoadConfig | None = None,
    overwrite: bool = False,
    arguments: dict[str, Any] | None = None,
    held: Held | None = None,
    lock_what: str | None = None,
) -> StageRun:
    """:func:`run_stage` for commands and recipes alike: the stage streams or stays resident by its rule
    (``load.stream``), its memory estimate is printed, a run that cannot fit stops before any work, and its
    work folder is locked. ``held`` (a recipe's previous output, in memory) is used in place of reading
    ``model_name`` when the stage runs resident, and released when it streams. A failed gate is in the report."""
    stage = stages()[name]
    load = load or LoadConfig()
    cfg = trusting(cfg, load)
    if hasattr(cfg, "_draft_dir"):  # spec --engine vllm reads the draft from the folder it equals, never name_or_path
        cfg = cfg.model_copy()
        cfg._draft_dir = model_name
    threads = apply_threads(load.threads)
    from draftkit.inputs import check_inputs

    check_inputs(name, model_name, cfg)  # a mistyped input is named before the output is looked at
    out = check_output_dir(out, overwrite=overwrite, inputs=(model_name, *config_paths(cfg)))
    t0 = time.perf_counter()
    if held is not None and held.path != model_name:
        held.release()
    in_compute = False  # loaded in the compute dtype rather than the stored one: never handed on
    # a command's output is locked while written; a recipe's stage (lock_what names its run) writes inside the
    # run's folder, which the run holds locked
    from draftkit.lock import output_lock_of, work_dir_lock

    with output_lock_of(out, stage.name, held=lock_what is not None), work_dir_lock(cfg, lock_what or stage.name), \
            computing(stage_compute(name, load)) as choice, estimate_line(flush=False):
        from draftkit.memory import activation_device, activation_store, announce_before_heavy_work

        # what the stage's checks and its per-layer form need of the input, read in one trip before any weights load
        facts = read_facts(model_name, device=load.device, trust_remote_code=load.trust_remote_code) \
            if stage.check is not None or stage.layers is not None else None
        if stage.check is not None:
            stage.check(facts.config, cfg)
        # the stage's per-layer form decides, before any weights load, whether it streams and how much it needs
        placement = stage.layers(facts, cfg, load) if stage.layers is not None else None
        estimate, streamed = (placement.estimate, placement.streamed) if placement is not None else (None, False)
        if placement is not None and placement.write is not None:  # streamed: it writes its output shard by shard
            if held is not None:
                held.release()
            report = placement.write(out=out, overwrite=overwrite, arguments=arguments)
            if choice is not None:
                report["compute"] = choice.name
            report["total_seconds"] = round(time.perf_counter() - t0, 3)
            return StageRun(None, None, report)
        if placement is not None and placement.run is not None:
            stage = stage.replace(run=placement.run)
        model = tokenizer = read = None
        if streamed:  # the stage reads the checkpoint's shards itself
            if held is not None:
                held.release()
            read = "tokenizer"
        elif held is not None and held.model is not None:
            model, tokenizer = held.model, held.tokenizer
        else:
            # a measuring stage (eval, spec) saves no weights: load them in the compute dtype at once
            read = choice.name if choice is not None and stage.save == "report" else load.dtype
            in_compute = read != load.dtype
        store = None
        if estimate is not None and not streamed:
            announce_before_heavy_work(estimate)
            store = activation_device(estimate, facts.device)
        with activation_store(store):  # resident activations placed by the estimate's decision, as streamed ones
            model, tokenizer, report = execute_stage(
                stage, model, tokenizer, cfg, out=out, source=model_name, load=load, overwrite=overwrite,
                arguments=arguments, read=read,
            )
    if estimate is not None:
        from draftkit.engine.placement import estimate_facts

        report.setdefault("memory_estimate_gb", estimate_facts(estimate))
    report["total_seconds"] = round(time.perf_counter() - t0, 3)
    report["threads"] = threads
    return StageRun(None if in_compute else model, tokenizer, report)


def execute_stage(
    stage: Stage,
    model,
    tokenizer,
    cfg: BaseModel,
    *,
    out: Path,
    source: str,
    load: LoadConfig,
    overwrite: bool = False,
    arguments: dict[str, Any] | None = None,
    read: str | None = None,
):
    """Run a stage on a model and write its output; returns ``(model, tokenizer, report)``. ``read``: what to read
    of ``source`` first when it is not in memory: ``"tokenizer"`` (a streamed stage reads the weights itself) or the
    dtype to load the whole model in.

    A stage that measures (eval with a quality gate) reports ``report["gate"] = {"passed": bool,
    "message": str}`` instead of raising, so its report is always written; callers then use
    :func:`raise_if_gate_failed`.
    """
    if read == "tokenizer":
        tokenizer = load_tokenizer(source, trust_remote_code=load.trust_remote_code)
    elif read is not None:
        model, tokenizer = load_model_and_tokenizer(source, dtype=read, device=load.device,
                                                    trust_remote_code=load.trust_remote_code)
    choice = current_compute() or stage_compute(stage.name, load)
    with estimate_line(flush=False), computing(choice), cast_for_compute(model if stage.save == "report" else None):
        model, report = stage.run(model, tokenizer, cfg)  # prune/sparsify/distill cast what they run themselves
    if choice is not None:
        report["compute"] = choice.name
    from draftkit.gates import judge

    judge(stage.name, cfg, report)  # report["gates"], ["passed"] (and ["gate"] when a threshold is set)
    args = {"config": cfg.model_dump(mode="json"), "load": load.model_dump(mode="json"), **(arguments or {})}
    provenance = make_provenance(stage=stage.name, source=source, arguments=args, facts=report)
    if not _is_main_process():  # under `accelerate launch`, rank 0 alone writes the output
        report["output"] = str(out)
        return model, tokenizer, report
    if stage.save is None:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            check_finite(model, stage.name)  # nothing is written when the result holds NaN/Inf
            write_model(model, tokenizer, tmp, provenance=provenance)
    elif stage.save == "report":
        with atomic_dir(out, overwrite=overwrite) as tmp:
            atomic_write_json(tmp / "report.json", {"provenance": provenance, "report": report})
            atomic_write_json(tmp / PROVENANCE_FILE, provenance)  # every stage folder carries draftkit.json
    else:
        check_finite(model, stage.name)
        report.update(stage.save(model, tokenizer, out, provenance, cfg, overwrite) or {})
    report["output"] = str(out)
    heavy_work_starts()  # the estimate line (compute dtype) of a stage that never said its heavy work started
    return model, tokenizer, report


def _is_main_process() -> bool:
    """True unless this is a non-zero rank of a multi-process (accelerate/torchrun) launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()
    return state.is_main_process


def raise_if_gate_failed(report: dict[str, Any]) -> None:
    gate = report.get("gate")
    if isinstance(gate, dict) and gate.get("passed") is False:
        raise GateFailedError(gate.get("message") or "quality gate failed")
