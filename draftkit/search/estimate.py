"""The search's memory estimate: the target, and beside it the largest step or measurement, each by the
estimate its own stage registers (:mod:`draftkit.registry`), so ``--dry-run``, preflight and the line the search
prints agree with the steps' own lines."""

from __future__ import annotations

from draftkit.search.config import SearchConfig


def longest_training_row(cfg: SearchConfig, tokenizer) -> int | None:
    """Tokens of the longest sequence a healed candidate trains on, as the training tokenizes it (it pads each
    micro-batch to its longest row): an SFT row; an SDD row is its prompt and at most ``regen_max_new_tokens`` of
    the target's answer. None when nothing trains."""
    from draftkit.distill import DistillConfig
    from draftkit.distill.loss import tokenize_example
    from draftkit.distill.rows import load_examples

    healing = {h for _, _, h in cfg.grid()}
    if not healing & {"sft", "sdd"} or cfg.dataset is None:
        return None
    longest = 0
    for e in load_examples(DistillConfig(dataset=cfg.dataset, limit=cfg.rows, regenerate=False)):
        sft = len(tokenize_example(tokenizer, e.prompt, e.reference, cfg.max_length)["input_ids"]) if "sft" in healing else 0
        sdd = len(tokenize_example(tokenizer, e.prompt, "", cfg.max_length)["input_ids"]) + cfg.regen_max_new_tokens
        longest = max(longest, sft, sdd if "sdd" in healing else 0)
    return min(longest, cfg.max_length)


def recipe_estimate(hf_config, cfg: SearchConfig, load, size: int, *, longest: int | None = None) -> int:
    """Peak memory of a search (the registry's estimate, and the one it prints): the process, the target
    (``size`` bytes, held all along), and beside it the largest of its steps, each by the estimate its own stage
    registers less the process (a prune or sparsify on a copy of the target, resident; a training), or a
    measurement (:func:`measurement_bytes`; the regeneration holds a second copy of the target, less). Trainings
    are sized on the target's config: an upper bound for a pruned student. ``longest``: the longest training row
    in tokens (:func:`longest_training_row`, when the data is at hand; a recipe's estimate assumes ``max_length``)."""
    from draftkit.memory import PROCESS_BYTES
    from draftkit.registry import stage as registered
    from draftkit.search.grid import REGEN, plan

    steps, cands = plan(cfg, target="target", rows="rows.jsonl")
    resident = load.model_copy(update={"stream": "off"})  # a step works on a model in memory
    beside = measurement_bytes(hf_config, cands, load, size)
    for step in steps.values():
        entry = registered(step.stage)
        if step.id != REGEN and entry is not None and entry.estimate is not None:
            config = step.config
            if longest is not None and "max_length" in type(config).model_fields:  # a training: padded to its longest row
                config = config.model_copy(update={"max_length": min(config.max_length, longest)})
            beside = max(beside, entry.estimate(hf_config, config, resident, size) - PROCESS_BYTES)
    return PROCESS_BYTES + size + beside


def measurement_bytes(hf_config, cands, load, size: int) -> int:
    """Beside the target, the largest measurement: the candidate's draft (the target's config less the blocks it
    drops; another base: the target's size) and, when the measurements compute in another dtype than the weights
    are stored in (``spec``'s compute: float32 under ``auto``), the casts of the target and of the draft, both
    alive while it runs. The target drafting for itself: its cast alone."""
    from draftkit.checkpoint import resolve_device
    from draftkit.compute import resolve_compute
    from draftkit.estimates import _bytes_per_param, count_params
    from draftkit.prune import PruneConfig
    from draftkit.prune.config import config_after

    params = count_params(hf_config)
    stored = _bytes_per_param(hf_config, load.dtype)
    compute = resolve_compute(load.compute, resolve_device(load.device), stage="spec").dtype.itemsize
    cast = compute if compute != stored else 0  # bytes per parameter of a cast copy
    most = params * cast
    for c in cands:
        if c.base is None and not c.steps:
            continue  # the target itself
        # another base is sized as the target
        draft = count_params(config_after(hf_config, PruneConfig(layers=c.drop))) if c.base is None and c.drop else params
        most = max(most, draft * stored + (params + draft) * cast)
    return most
