"""Quality of a draft: local offline tasks, lm-eval tasks, and recovery against a baseline (the teacher).

``eval_stage(model, tokenizer, cfg)`` is the stage function; ``report["gate"]`` carries the
``--min-recovery`` verdict (the stage runner raises GateFailedError after the report is written).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from draftkit import console
from draftkit.errors import DataError, InvalidInputError
from draftkit.evaluate.tasks import LOCAL_TASKS

PPL_TASK = "perplexity"
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}
PRIMARY_ORDER = ("acc_norm", "acc", "exact_match", "f1", "mcc", "perplexity", "word_perplexity")


class EvalConfig(BaseModel):
    """Settings of ``draftkit eval``."""

    model_config = ConfigDict(extra="forbid")
    # set from --trust-remote-code (load.trust_remote_code) by :func:`draftkit.stages.trusting`: the other model
    # this stage loads (eval's baseline, spec's target, export's serving target) may run its repository's code
    _trust_remote_code: bool = PrivateAttr(False)

    tasks: list[str] = Field(
        default_factory=list,
        description="tasks to run: tiny-arith (offline demo task) or any lm-eval task name (needs draftkit[eval])",
    )
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples for lm-eval tasks (task default if unset)")
    limit: int | None = Field(None, ge=1, description="evaluate at most this many examples per task (--ppl: the "
                              "file's first rows, or a .txt file's first paragraphs)")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass / generate call")
    ppl: str | None = Field(
        None, description="local .txt/.jsonl file to measure perplexity on (response tokens of chat rows; "
        "sliding windows over plain text); streamed layer by layer from large checkpoints (--stream)"
    )
    ppl_seqlen: int = Field(1024, ge=8, description="perplexity window length in tokens (capped by the context)")
    ppl_stride: int | None = Field(None, ge=1, description="perplexity window stride (default: half the window)")
    arith_data: str | None = Field(None, description="question/answer .jsonl for tiny-arith (default: the demo test split)")
    max_new_tokens: int = Field(128, ge=1, description="generation budget of generative local tasks")
    include_path: str | None = Field(None, description="directory of extra lm-eval task YAMLs (e.g. local datasets)")
    baseline: str | None = Field(None, description="baseline model (the unpruned teacher) to compute quality recovery against")
    min_recovery: float | None = Field(
        None, gt=0, description="fail (exit code 3) when the mean recovery against the baseline is below this"
    )
    min_task_recovery: float | None = Field(
        None, gt=0, description="fail (exit code 3) when any one task's recovery against the baseline is below this"
    )
    max_regression: float | None = Field(
        None, gt=0, lt=1, description="fail (exit code 3) when the mean recovery fell by more than this fraction "
        "from the last run (a recipe run with --compare)"
    )
    cache: bool = Field(True, description="reuse baseline results cached by model hash and settings")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if not self.tasks and not self.ppl:
            raise ValueError("nothing to evaluate: pass --tasks (e.g. tiny-arith) and/or --ppl FILE")
        for gate in ("min_recovery", "min_task_recovery", "max_regression"):
            if getattr(self, gate) is not None and not self.baseline:
                raise ValueError(f"--{gate.replace('_', '-')} needs --baseline (the model to recover against)")
        dup = {t for t in self.tasks if self.tasks.count(t) > 1}
        if dup:
            raise ValueError(f"task(s) listed twice: {', '.join(sorted(dup))}")
        return self

    def lm_eval_tasks(self) -> list[str]:
        return [t for t in self.tasks if t not in LOCAL_TASKS]


def check_eval(hf_config, cfg: EvalConfig) -> None:
    """Fail fast, before any weights load: unknown tasks, missing files, a bad baseline reference."""
    from draftkit.evaluate.lmeval import check_tasks

    for name, path in (("--ppl", cfg.ppl), ("--arith-data", cfg.arith_data)):
        if path and not Path(path).is_file():
            raise DataError(f"{name} file {path} does not exist")
    check_tasks(cfg.lm_eval_tasks(), cfg.include_path, local=LOCAL_TASKS + (f"--ppl ({PPL_TASK})",))
    if cfg.lm_eval_tasks():
        from draftkit.hub import offline_if_unreachable

        offline_if_unreachable()  # without network the tasks' datasets come from the cache or fail at once
    if cfg.baseline:
        from draftkit.refs import resolve_model_ref

        resolve_model_ref(cfg.baseline)


def run_tasks(model, tokenizer, cfg: EvalConfig) -> dict[str, dict[str, float]]:
    """All configured tasks on one in-memory model: ``{task: {metric: value}}``."""
    from draftkit.evaluate import tasks as local

    results: dict[str, dict[str, float]] = {}
    for t in cfg.tasks:
        if t == "tiny-arith":
            results[t] = local.tiny_arith(model, tokenizer, data=cfg.arith_data, limit=cfg.limit,
                                          batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
    lm_tasks = cfg.lm_eval_tasks()
    if lm_tasks:
        from draftkit.evaluate.lmeval import run_lm_eval

        results.update(run_lm_eval(model, tokenizer, lm_tasks, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                   batch_size=cfg.batch_size, include_path=cfg.include_path))
    if cfg.ppl:
        from draftkit.evaluate.perplexity import perplexity

        results[PPL_TASK] = perplexity(model, tokenizer, cfg.ppl, seqlen=cfg.ppl_seqlen, stride=cfg.ppl_stride,
                                       batch_size=cfg.batch_size, limit=cfg.limit)
    return results


def primary_metric(task: str, metrics: dict[str, float]) -> str | None:
    """The metric recovery is computed on: the task's entry in ``lmeval.PRIMARY_METRICS`` when it reports it,
    else the first of :data:`PRIMARY_ORDER` present, else the first numeric metric."""
    from draftkit.evaluate.lmeval import PRIMARY_METRICS

    explicit = PRIMARY_METRICS.get(task)
    if explicit in metrics:
        return explicit
    for name in PRIMARY_ORDER:
        if name in metrics:
            return name
    for name, value in metrics.items():
        if isinstance(value, float):
            return name
    return None


def recovery(value: float, base: float, metric: str) -> float | None:
    """Quality recovery: value / baseline (baseline / value for lower-is-better metrics)."""
    if metric.split(",")[0] in LOWER_IS_BETTER:
        return base / value if value else None
    return value / base if base else None


def _cache_file(cfg: EvalConfig, dtype: str = "auto") -> Path:
    """The cached results of ``cfg.baseline`` evaluated as ``cfg`` says, loaded in ``dtype``."""
    from draftkit._version import __version__
    from draftkit.fingerprint import content_hash
    from draftkit.refs import resolve_model_ref

    ref = resolve_model_ref(cfg.baseline)
    settings = cfg.model_dump(include={"tasks", "num_fewshot", "limit", "ppl_seqlen", "ppl_stride", "max_new_tokens",
                                       "arith_data", "include_path"})
    for key in ("ppl", "arith_data"):
        path = getattr(cfg, key)
        settings[f"{key}_hash"] = _file_hash(path) if path else None
    settings["dtype"] = dtype  # a bfloat16 baseline measures differently from a float32 one
    key = json.dumps([content_hash(ref.location, model=True) if ref.local else ref.location, settings, __version__], sort_keys=True)
    from draftkit.atomic import cache_root

    return cache_root() / "eval" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def baseline_results(cfg: EvalConfig, load_dtype: str = "auto", device: str = "cpu") -> tuple[dict, bool]:
    """The baseline's results, from the cache when ``cfg.cache`` and present; returns ``(results, cached)``."""
    from types import SimpleNamespace

    from draftkit.atomic import atomic_write_json

    file = _cache_file(cfg, load_dtype)
    if cfg.cache and file.is_file():
        try:
            results = json.loads(file.read_text())["results"]
            from draftkit.cachelimit import touch

            touch(file)  # recently used: DRAFTKIT_CACHE_LIMIT evicts it last
            return results, True
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    console.info(f"evaluating the baseline {cfg.baseline}")
    # the settings of stages.LoadConfig that loading reads (stages imports this module, not the reverse)
    load = SimpleNamespace(dtype=load_dtype, device=device, stream="auto", trust_remote_code=cfg._trust_remote_code)
    results = measure(cfg.baseline, cfg, load)
    if cfg.cache:
        try:
            atomic_write_json(file, {"baseline": cfg.baseline, "results": results})
        except OSError as exc:
            console.warn(f"could not cache the baseline results in {file}: {exc}")
    return results, False


def measure(model_name: str, cfg: EvalConfig, load) -> dict[str, dict[str, Any]]:
    """:func:`run_tasks` on ``model_name`` loaded as ``load`` says; a perplexity-only evaluation is streamed
    layer by layer by the rule of the other stages (:func:`draftkit.evaluate.streamed.place_eval`)."""
    from draftkit.checkpoint import load_model_and_tokenizer
    from draftkit.evaluate.streamed import place_eval, streamed_perplexity
    from draftkit.memory import announce_before_heavy_work

    streamed, estimate, prepared = place_eval(model_name, cfg, load)
    if streamed:
        assert estimate is not None and prepared is not None
        return {PPL_TASK: streamed_perplexity(model_name, load, estimate, prepared)}
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=load.dtype, device=load.device,
                                                trust_remote_code=load.trust_remote_code)
    if estimate is not None:
        announce_before_heavy_work(estimate)
    if prepared is not None:  # perplexity only: the batches place_eval made (the file is not tokenized twice)
        from draftkit.evaluate.perplexity import resident_perplexity

        return {PPL_TASK: resident_perplexity(model, prepared)}
    return run_tasks(model, tokenizer, cfg)


def streamed_eval_stage(model_name: str, load, estimate, prepared):
    """The eval stage function when the perplexity is streamed from ``model_name``'s shards: it gets no model."""
    from draftkit.engine.placement import estimate_facts
    from draftkit.evaluate.streamed import streamed_perplexity

    def run(_model, tokenizer, cfg: EvalConfig):
        results = {PPL_TASK: streamed_perplexity(model_name, load, estimate, prepared)}
        from draftkit.compute import load_dtype

        dtype = load_dtype(load.dtype if load.dtype != "auto" else None)  # the baseline runs as this model did
        report = evaluate(None, tokenizer, cfg, device=load.device, results=results, dtype=dtype)
        report["streamed"] = True
        report["memory_estimate_gb"] = estimate_facts(estimate)
        return None, report

    return run


def eval_layers(facts, cfg: EvalConfig, load):
    """The eval stage's per-layer form (registered in :mod:`draftkit.registry`): a perplexity-only evaluation
    streams by the rule of every layer-wise stage, and a resident one scores the batches made for its estimate."""
    from draftkit.engine.placement import Placement
    from draftkit.evaluate.streamed import place_eval

    model_name = facts.name
    streamed, estimate, prepared = place_eval(model_name, cfg, load, facts)
    if streamed:
        assert estimate is not None and prepared is not None
        return Placement(True, estimate, run=streamed_eval_stage(model_name, load, estimate, prepared))
    return Placement(False, estimate, run=batched_eval_stage(prepared) if prepared is not None else None)


def batched_eval_stage(prepared):
    """The eval stage function for a resident perplexity-only evaluation: it scores the batches
    :func:`draftkit.evaluate.streamed.place_eval` already made for the memory estimate."""
    from draftkit.evaluate.perplexity import resident_perplexity

    def run(model, tokenizer, cfg: EvalConfig):
        results = {PPL_TASK: resident_perplexity(model, prepared)}
        return model, evaluate(model, tokenizer, cfg, device=str(next(model.parameters()).device), results=results)

    return run


def evaluate(model, tokenizer, cfg: EvalConfig, *, device: str = "cpu", results: dict | None = None,
             dtype: str | None = None) -> dict[str, Any]:
    """Run the tasks on ``model`` (or take their ``results``, measured layer-streamed), evaluate the baseline
    (in the model's dtype, or ``dtype``), compute recovery and the gate verdict."""
    if results is None:
        results = run_tasks(model, tokenizer, cfg)
    report: dict[str, Any] = {"tasks": results, "primary": {t: primary_metric(t, m) for t, m in results.items()}}
    for t, m in report["primary"].items():
        console.info(f"{t}: primary metric {m}")
    if cfg.baseline:
        if dtype is None:
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.") if model is not None else "auto"
        base, cached = baseline_results(cfg, load_dtype=dtype, device=device)
        rec = {}
        for t, metrics in results.items():
            m = report["primary"][t]
            if m is not None and m in base.get(t, {}):
                rec[t] = recovery(metrics[m], base[t][m], m)
        valid = [v for v in rec.values() if v is not None]
        mean = sum(valid) / len(valid) if valid else None
        report["baseline"] = {"model": cfg.baseline, "tasks": base, "cached": cached}
        report["recovery"] = rec
        report["mean_recovery"] = mean
    from draftkit.gates import judge

    judge("eval", cfg, report)  # min_recovery (mean), min_task_recovery (each task): report["gates"], ["passed"]
    return report


def eval_stage(model, tokenizer, cfg: EvalConfig):
    """Stage function: ``(model, tokenizer, cfg) -> (model, report)``; the model is not changed."""
    if tokenizer is None:
        raise InvalidInputError("eval needs the model's tokenizer")
    device = str(next(model.parameters()).device)
    return model, evaluate(model, tokenizer, cfg, device=device)
