"""lm-evaluation-harness on the in-memory model (``HFLM(pretrained=model)``: no second load from disk).

lm-eval is an extra (``pip install draftkit[eval]``); the local tasks work without it.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

from draftkit.errors import DataError, InvalidInputError


def available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _task_manager(include_path: str | None, tasks: tuple[str, ...] = ()):
    """Index only ``include_path`` when it holds every requested task (indexing lm-eval's ~15k built-in
    tasks takes tens of seconds); otherwise the full index."""
    if include_path and tasks:
        local = _manager(include_path, False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return _manager(include_path, True)


def known_tasks(include_path: str | None = None, tasks: tuple[str, ...] = ()) -> list[str]:
    return list(_task_manager(include_path, tasks).all_tasks)


def check_tasks(tasks: list[str], include_path: str | None = None, local: tuple[str, ...] = ()) -> None:
    """Raise one line naming the closest known tasks for any name lm-eval does not know."""
    if not tasks:
        return
    if not available():
        raise InvalidInputError(
            f"task(s) {', '.join(tasks)} need lm-eval: pip install 'draftkit[eval]' "
            f"(offline tasks without it: {', '.join(local)} and --ppl FILE)"
        )
    names = known_tasks(include_path, tuple(tasks))
    known = set(names)
    for t in tasks:
        if t not in known:
            close = difflib.get_close_matches(t, names + list(local), n=4, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm-eval ls tasks` lists them"
            raise InvalidInputError(f"unknown task {t!r}{hint}")


# The metric that stands for each well-known task (lm-eval keys are "metric,filter"). Tasks not listed fall back
# to the first of PRIMARY_ORDER (in draftkit.evaluate) that the task reports; the choice is printed.
PRIMARY_METRICS = {
    "gsm8k": "exact_match,strict-match",
    "gsm8k_cot": "exact_match,strict-match",
    "gsm8k_cot_zeroshot": "exact_match,strict-match",
    "mmlu": "acc",
    "mmlu_pro": "exact_match,custom-extract",
    "hellaswag": "acc_norm",
    "arc_challenge": "acc_norm",
    "arc_easy": "acc_norm",
    "piqa": "acc_norm",
    "winogrande": "acc",
    "boolq": "acc",
    "openbookqa": "acc_norm",
    "truthfulqa_mc2": "acc",
    "lambada_openai": "acc",
    "wikitext": "word_perplexity",
    "ifeval": "prompt_level_strict_acc",
}


def aggregate(results: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """One row per requested task from ``simple_evaluate``'s output: a group's aggregate score (``groups``,
    e.g. MMLU's mean over its ~60 subtasks) rather than its subtasks, so each requested task counts once."""
    groups = results.get("groups") or {}
    rows = results.get("results") or {}
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        metrics = groups.get(task) or rows.get(task)
        if metrics is None:
            continue
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if "stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            clean[name if filt in ("", "none") else f"{name},{filt}"] = float(value)
        out[task] = clean
    return out


def run_lm_eval(model, tokenizer, tasks: list[str], *, num_fewshot: int | None = None, limit: int | None = None,
                batch_size: int = 8, include_path: str | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on ``model``; return ``{requested task: {metric: value}}`` (groups aggregated,
    stderr entries dropped)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from draftkit.hub import offline_if_unreachable, unreachable_hint

    device = str(next(model.parameters()).device)
    offline = offline_if_unreachable()  # the tasks' datasets from the local cache, or one line at once
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
            task_manager=_task_manager(include_path, tuple(tasks)), log_samples=False, bootstrap_iters=0,
        )
    except OSError as exc:  # ConnectionError, offline mode, a dataset not found: the tasks' data, not a bug
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        where = f"it is not in the local cache and {unreachable_hint()}" if offline else first
        raise DataError(f"lm-eval task(s) {', '.join(tasks)}: a dataset could not be loaded ({where}); run them "
                        "once where there is network, or pass --include-path with task YAMLs on local files") from None
    return aggregate(results or {}, list(tasks))
