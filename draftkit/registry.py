"""Every stage, registered in one place: what it is, how it runs, what it reads, how it is shown.

A stage is one :class:`Stage` entry below. The command line (``draftkit --help`` and each stage's command), the
recipe's stage union (:func:`draftkit.recipe.recipe_model`), resume (:mod:`draftkit.fingerprint`), preflight,
the ``--dry-run`` estimates, the quality gates, the run report and the GPU out-of-memory line read it; none of
them names a stage. Adding a stage is adding one entry here (or :func:`register` for one defined elsewhere).

Entries name their functions as ``"module:attribute"`` so that reading the registry imports nothing heavy
(``draftkit --help`` stays fast); an attribute is imported the first time it is used. A callable may be given
in place of a name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# fields and their defaults; those in _REFS are "module:attribute" names (or the objects themselves)
_DEFAULTS: dict[str, Any] = {
    "config": None,  # the pydantic config: drives the recipe entry, the Python API and the command's options
    "run": None,  # (model, tokenizer, cfg) -> (model, report); reads="models": (models, cfg, *, out, ...) -> report
    "help": "",  # the one line `draftkit --help` shows (the first sentence of the command's docstring)
    "command": None,  # the CLI command (a typer function, or a typer app with kind "group")
    "command_kind": "command",
    # None: the stage writes a model directory with save_model. Otherwise a writer
    # ``save(model, tokenizer, out, provenance, cfg, overwrite) -> dict`` (e.g. export), or "report"
    # for stages that only measure (eval, spec) and write report.json.
    "save": None,
    "check": None,  # check(hf_config, cfg) before the weights load: settings that do not fit the model fail fast
    # "model": ``run`` takes the model the stage before made. "models": the stage reads several models from
    # their checkpoints itself (merge), named by the config's ``models`` (see draftkit.branches).
    "reads": "model",
    # the other models and data the config names, for fingerprints and input checks: ((dotted field, kind), ...)
    # with kind "model", "data" or "text" (hashed as is); or a function of the config (a dict) returning them
    "references": (),
    "computes": True,  # runs forwards, in a compute dtype (draftkit.compute)
    "auto_float32": None,  # why ``compute: auto`` keeps float32 for it (bf16 changes its result beyond noise)
    # the per-layer form: layers(facts, cfg, load) -> draftkit.engine.placement.Placement (stream or not, the memory
    # estimate, and the per-layer runner), decided before any weights load from the input's CheckpointFacts
    "layers": None,
    # the recipe's memory estimate of the stage (--dry-run, preflight): estimate(hf_config, cfg, load, ckpt_bytes)
    # -> bytes; default: the weights and a fifth
    "estimate": None,
    "after": None,  # after(hf_config, cfg) -> the config the next stage sees (prune: fewer layers)
    "preflight": None,  # preflight(collector, where, recipe, step, hf_config): the recipe-level checks
    "oom": "the batch or calibration sizes",  # what to lower when a GPU runs out of memory in it
    "metrics": (),  # headline report keys for report.md
    "gates": (),  # quality gates: ((config field, metric, ">=" | "<="), ...)
    "relative_gate": None,  # the metric max_regression bounds (draftkit.compare)
    "plots": None,  # plots(report, plots_dir) -> list of written paths (draftkit.report)
    "compared": None,  # compared(report, tag, put): the metrics draftkit.compare follows night over night
}
_REFS = {"config", "run", "command", "save", "check", "references", "layers", "estimate", "after", "preflight",
         "plots", "compared"}


def resolve(ref: Any) -> Any:
    """``"module:attribute"`` imported; anything else as is."""
    if isinstance(ref, str) and ":" in ref:
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)
    return ref


class Stage:
    """One stage's registration (fields: :data:`_DEFAULTS`); named functions are imported when used."""

    def __init__(self, name: str, **fields: Any):
        unknown = set(fields) - set(_DEFAULTS)
        if unknown:
            raise TypeError(f"stage {name}: unknown fields {sorted(unknown)}")
        self.name = name
        self._fields = {**_DEFAULTS, **fields}

    def __getattr__(self, key: str) -> Any:
        fields = self.__dict__.get("_fields")
        if fields is None or key not in fields:
            raise AttributeError(key)
        value = fields[key]
        # looked up on each use (not kept): what the module holds now, as a plain import at the call would see
        return resolve(value) if key in _REFS else value

    def replace(self, **fields: Any) -> Stage:
        return Stage(self.name, **{**self._fields, **fields})

    @property
    def makes_model(self) -> bool:
        """Whether its output is a model folder (save_model) the next stage can read."""
        return self._fields["save"] is None

    def reference_fields(self, config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        refs = self.references
        return tuple(refs(config)) if callable(refs) else tuple(refs)

    def __repr__(self) -> str:
        return f"Stage({self.name!r})"


_P = "draftkit."
BUILTIN: tuple[Stage, ...] = (
    Stage("prune", config=_P + "prune:PruneConfig", run=_P + "prune:prune_model", check=_P + "prune:check_prune",
          help="Drop N decoder blocks, scored by angular distance between hidden states.",
          command=_P + "cli.prune:prune", references=(("calib.path", "data"),),
          layers=_P + "prune.layerwise:prune_layers", estimate=_P + "prune.layerwise:recipe_estimate",
          after=_P + "prune.config:config_after", preflight=_P + "preflight:check_calibrated",
          oom="--batch-size or --samples, or pass --stream on",
          metrics=("dropped_layers", "layers_after", "params_after"), plots=_P + "report:plot_layer_distances"),
    Stage("sparsify", config=_P + "sparsify:SparsifyConfig", run=_P + "sparsify:sparsify_model",
          check=_P + "sparsify.calib:check_sparsify",
          help="Prune individual weights of every decoder linear (embeddings and lm_head stay dense), one layer at a "
               "time, with SparseGPT (default), Wanda or magnitude.",
          command=_P + "cli.sparsify:sparsify", references=(("calib.path", "data"),),
          layers=_P + "sparsify.layerwise:sparsify_layers", estimate=_P + "sparsify.layerwise:recipe_estimate",
          after=_P + "sparsify.config:config_after", preflight=_P + "preflight:check_calibrated", oom="--chunk-tokens or --samples, or pass --stream on",
          metrics=("method", "pattern", "sparsity", "mean_rel_error"), plots=_P + "report:plot_layer_sparsity"),
    Stage("distill", config=_P + "distill:DistillConfig", run=_P + "distill:distill_model",
          check=_P + "distill:check_distill",
          help="Self-data distillation: the teacher rewrites the SFT set, then the student is fine-tuned on it with "
               "its sparsity masks held fixed.",
          command=_P + "cli.distill:app", command_kind="group", references=_P + "distill.config:references",
          estimate=_P + "distill.estimate:recipe_estimate", preflight=_P + "preflight:check_distill",
          oom="--train-batch-size or --max-length (or pass --gradient-checkpointing); for regeneration --batch-size",
          metrics=("regenerate.acceptance_rate", "train.steps", "train.eval_loss_before", "train.eval_loss_after",
                   "train.zero_positions_changed")),
    Stage("merge", config=_P + "merge:MergeConfig", run=_P + "merge:merge_checkpoints", reads="models",
          help="Merge models tensor by tensor (SLERP, linear, task arithmetic), keeping their sparsity masks.",
          command=_P + "cli.merge:merge", references=(("base", "model"),), computes=False,
          estimate=_P + "merge.runner:recipe_estimate", preflight=_P + "preflight:check_merge",
          metrics=("method", "t", "weights", "sparsity", "layer_sparsity", "tensors_with_different_masks")),
    Stage("export", config=_P + "export:ExportConfig", run=_P + "export:export_stage", save=_P + "export:write_export",
          check=_P + "export:check_export",
          help="Write a sparse (compressed-tensors sparse-bitmask) or dense safetensors checkpoint.",
          command=_P + "cli.export:export", computes=False, estimate=_P + "memory_stages:export_recipe_estimate",
          oom="--max-shard-size", metrics=("format", "bytes_on_disk", "dense_bytes", "ratio_to_dense", "serve.status")),
    Stage("eval", config=_P + "evaluate:EvalConfig", run=_P + "evaluate:eval_stage", save="report",
          check=_P + "evaluate:check_eval",
          help="Evaluate a model; with --baseline, report quality recovery and gate on it (exit code 3).",
          command=_P + "cli.evaluate:evaluate",
          references=(("baseline", "model"), ("ppl", "data"), ("arith_data", "data"), ("include_path", "data")),
          layers=_P + "evaluate:eval_layers", estimate=_P + "estimates:weights_and_other",
          preflight=_P + "preflight:check_eval", oom="--batch-size or --ppl-seqlen",
          metrics=("mean_recovery", "recovery", "tasks"),
          gates=(("min_recovery", "mean_recovery", ">="), ("min_task_recovery", "recovery", ">=")),
          relative_gate="mean_recovery", plots=_P + "report:plot_recovery", compared=_P + "compare:eval_metrics"),
    Stage("spec", config=_P + "evaluate.spec:SpecConfig", run=_P + "evaluate.spec:spec_stage", save="report",
          check=_P + "evaluate.spec:check_spec",
          help="Speculative decoding, greedy or sampled (--temperature): mean accepted length (MAL), the speedup "
               "measured in an engine (--engine), the latency cost model's prediction for every k, and a dynamic k "
               "(--k dynamic).",
          command=_P + "cli.spec:spec", references=(("target", "model"), ("prompts", "data")),
          estimate=_P + "memory_stages:spec_recipe_estimate", preflight=_P + "preflight:check_spec",
          auto_float32="greedy spec must stay lossless; in bf16 the target's one-token decode and its batched "
                       "verification round differently and broke it on 1 of 8 SmolLM2-135M prompts "
                       "(benchmarks/compute_dtype.py)",
          oom="--max-new-tokens, or use a smaller target",
          metrics=("mal_per_step", "mal", "mode", "acceptance_by_position", "expected_speedup_macs", "lossless"),
          gates=(("min_mal", "mal", ">="), ("min_acceptance", "acceptance_rate", ">="),
                 ("min_speedup", "speedup", ">=")),
          relative_gate="mal", compared=_P + "compare:spec_metrics"),
    Stage("search", config=_P + "search:SearchConfig", run=_P + "search:search_stage", save=_P + "search:write_search",
          check=_P + "search:check_search",
          help="Build and measure draft candidates for a target (blocks dropped x sparsity x healing, or other "
               "bases): MAL, measured cost, predicted and engine speedup, the frontier, and the best draft as a recipe.",
          command=_P + "cli.search:search",
          references=(("dataset", "data"), ("prompts", "data"), ("more_prompts", "data"), ("calib.path", "data")),
          estimate=_P + "search:recipe_estimate", preflight=_P + "search:preflight",
          oom="--train-batch-size or --max-length (training), --regen-batch-size (regeneration)",
          metrics=("best", "best_predicted_speedup", "frontier", "shared_steps")),
)
_registered: dict[str, Stage] = {s.name: s for s in BUILTIN}


def stages() -> dict[str, Stage]:
    """All stages by name, in registration order."""
    return dict(_registered)


def stage(name: str) -> Stage | None:
    """The stage registered as ``name`` (None when there is none: e.g. a command that is not a stage)."""
    return _registered.get(name)


def by_command(command: str) -> Stage | None:
    """The stage a command runs, by the command's name or its module's (``evaluate`` for eval)."""
    for entry in _registered.values():
        ref = entry._fields["command"]
        module = ref.partition(":")[0] if isinstance(ref, str) else getattr(ref, "__module__", "")
        if command and command in (entry.name, module.rsplit(".", 1)[-1]):
            return entry
    return None


def register(entry: Stage) -> None:
    """Add a stage defined outside this module (after the built-in ones)."""
    if entry.name in _registered:
        raise ValueError(f"a stage named {entry.name!r} is already registered")
    _registered[entry.name] = entry


@contextmanager
def registered(entry: Stage) -> Iterator[Stage]:
    """A stage registered for the duration of the block (tests, plugins tried out)."""
    register(entry)
    try:
        yield entry
    finally:
        _registered.pop(entry.name, None)


def each(field: str) -> Iterator[tuple[str, Any]]:
    """``(stage name, value)`` of one field for every stage that sets it."""
    for name, entry in _registered.items():
        if entry._fields[field] not in (None, ()):
            yield name, getattr(entry, field)


Hook = Callable[..., Any]
