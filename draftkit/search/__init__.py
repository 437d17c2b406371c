"""``draftkit search``: build many draft candidates for one target and find the one worth serving.

Candidates are blocks dropped by angular distance x a sparsity x a healing (none, SFT, self-data distillation),
or other draft bases; the target's regenerated answers are produced once for every SDD candidate and each prune
once for all its sparsities. Each candidate gets its MAL (every k up to ``k``, acceptance by position), its
measured per-token cost and the latency cost model's predicted speedup; the frontier (best MAL for its cost) also
the speedup an engine measures. The best candidate is written out as a recipe that ``draftkit run`` reproduces.

Python API::

    from draftkit.search import SearchConfig
    from draftkit.stages import run_stage
    cfg = SearchConfig(drop=[1, 2], healing=["none", "sdd"], dataset="train.jsonl", prompts="test.jsonl")
    report = run_stage("search", "examples/tiny/teacher", cfg, out="search-out")
"""

from __future__ import annotations

from typing import Any

from draftkit.search.config import SearchConfig
from draftkit.search.estimate import longest_training_row, recipe_estimate

__all__ = ["SearchConfig", "check_search", "longest_training_row", "preflight", "recipe_estimate", "search_stage",
           "write_search"]


def search_stage(model, tokenizer, cfg: SearchConfig) -> tuple[Any, dict[str, Any]]:
    """Stage function: the loaded model is the target; the report lists every candidate."""
    from draftkit.search.runner import run_search

    estimate = announce_estimate(model, tokenizer, cfg)
    name = cfg._draft_dir or getattr(model, "name_or_path", None) or "target"
    report = run_search(model, tokenizer, cfg, target_name=name)
    report["memory_estimate_gb"] = estimate
    return model, report


def announce_estimate(model, tokenizer, cfg: SearchConfig) -> dict[str, float]:
    """Print the search's memory estimate (:func:`recipe_estimate` for the loaded target) before its heavy work,
    and warn when it is above what the machine has free; the report's entry (GB, ``host`` or ``device``)."""
    from draftkit import console
    from draftkit.memory import available_device_bytes, available_host_bytes
    from draftkit.memory_stages import model_bytes
    from draftkit.stages import LoadConfig

    device = next(model.parameters()).device
    estimate = recipe_estimate(model.config, cfg, LoadConfig(device=str(device)), model_bytes(model),
                               longest=longest_training_row(cfg, tokenizer))
    free = available_device_bytes(device) or available_host_bytes()
    where = "host" if device.type == "cpu" else str(device)
    console.info(f"memory estimate: {where} {estimate / 1e9:.2f} GB (the target, and beside it the largest step: "
                 f"a prune, a sparsify, a training, the regeneration or a measurement); {free / 1e9:.1f} GB free")
    if estimate > free:
        console.warn(f"the search may not fit: it needs about {estimate / 1e9:.1f} GB and {free / 1e9:.1f} GB are "
                     "free; lower --train-batch-size or --max-length, or run it on a larger machine")
    return {"host" if device.type == "cpu" else "device": round(estimate / 1e9, 3)}


def write_search(model, tokenizer, out, provenance, cfg, overwrite) -> dict[str, Any]:
    from draftkit.search.output import write_search as write

    return write(model, tokenizer, out, provenance, cfg, overwrite)


def check_search(hf_config, cfg: SearchConfig) -> None:
    """Before any weights load: the prompts and data are readable, the blocks to drop exist, the bases resolve."""
    from draftkit.errors import InvalidInputError
    from draftkit.evaluate.spec import _is_prompt_source
    from draftkit.modeling import text_config
    from draftkit.refs import resolve_model_ref
    from draftkit.search.grid import regen_config

    for what, path in (("prompts", cfg.prompts), ("more_prompts", cfg.more_prompts)):
        if path and not _is_prompt_source(path):
            raise InvalidInputError(f"{what} file {path} does not exist")
    layers = getattr(text_config(hf_config), "num_hidden_layers", None)
    too_many = [d for d, _, _ in cfg.grid() if layers is not None and d >= layers]
    if too_many:
        raise InvalidInputError(f"cannot drop {too_many[0]} blocks of a model with {layers}: choose drop values "
                                f"below {layers}")
    for base in cfg.bases:
        resolve_model_ref(base)
    healings = {h for _, _, h in cfg.grid()} | (set(cfg.healing) if cfg.bases else set())
    if healings & {"sft", "sdd"}:
        from draftkit.distill import load_examples

        load_examples(regen_config(cfg, "target"))  # the data has prompts and answers
    if "sdd" in healings and cfg.engine == "vllm":
        from draftkit.distill import check_vllm

        check_vllm()


def preflight(c, where: str, recipe, step, hf_config) -> None:
    """The search stage's recipe checks: :func:`check_search`, and its calibration data when a candidate prunes."""
    from draftkit.data import DEFAULT_CALIB
    from draftkit.preflight import sample_rows

    cfg = step.config
    if hf_config is not None:
        c.run(where, check_search, hf_config, cfg)
    if any(d or s != "0" for d, s, _ in cfg.grid()):
        c.run(f"{where}.calib.path", sample_rows, cfg.calib.path or DEFAULT_CALIB, cfg.calib.split)
