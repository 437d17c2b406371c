"""Preflight: every check of every stage of a recipe, before any stage works.

``draftkit run`` calls :func:`preflight` before it writes anything; ``draftkit recipes validate`` calls the
same function and stops there. It reads configs, tokenizers and a few rows, never weights, so it answers in
seconds. Every problem is reported, one line each, with the recipe path of the setting at fault::

    stages[3].spec.prompts: hub dataset HuggingFaceH4/mt_bench_prompts is not in the local cache and the hub is offline
    stages[1].distill.dataset: rows have no prompt/response columns; columns found: ['x']; pass columns: ...

What is checked:

* models (the recipe's model, distill's teacher, eval's baseline, spec's target) resolve: a local directory,
  an alias, the shipped demo teacher, or a hub id found in the local hub cache (or reachable when online);
* data (calibration sets, distill datasets, spec prompts, eval files) exist and a few rows have usable
  columns, local files and hub datasets alike (a hub dataset is read from the local hub cache, or streamed
  when online);
* each stage's own checks against the model's config as it will be when the stage runs (layers left after
  a prune, N:M widths), the spec draft/target tokenizers, settings that only make sense together;
* with ``environment=True`` (the default, and always for ``run``): this machine can run it (the device
  exists, the extras are installed, the weights fit in the device's memory).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftkit.errors import DraftkitError, InvalidInputError
from draftkit.input_errors import first_line

HUB_FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
SAMPLE_ROWS = 5


class PreflightError(InvalidInputError):
    """A recipe would fail: the message lists every problem, one line each."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        n = len(problems)
        head = f"the recipe would fail ({n} problem{'s' if n > 1 else ''}); nothing was run or written:"
        super().__init__("\n".join([head, *(f"  {p}" for p in problems)]))


@dataclass(frozen=True)
class Problem:
    where: str  # recipe path: model, load.device, stages[2].distill.dataset
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def check_model(name: str, *, trust_remote_code: bool = False):
    """The model's config (no weights): a local directory, alias or hub id from the cache or the hub.

    Raises:
        DraftkitError: one line saying why it does not resolve.
    """
    from draftkit.checkpoint import load_config

    return load_config(name, trust_remote_code=trust_remote_code)


def _tokenizer(name: str, trust_remote_code: bool):
    from draftkit.checkpoint import load_tokenizer

    return load_tokenizer(name, trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------------------------
# Data: a few rows of a local file or a hub dataset
# --------------------------------------------------------------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False") or \
        os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0", "false", "False")


def _is_local(source: str) -> bool:
    p = Path(source).expanduser()
    return p.exists() or p.suffix.lower() in (".txt", *HUB_FILE_SUFFIXES) or source.startswith((".", "/", "~"))


def sample_rows(source: str, split: str = "train", n: int = SAMPLE_ROWS) -> list[dict[str, Any]]:
    """The first ``n`` rows of a local data file or a hub dataset (``owner/name[:config]``).

    A hub dataset is read from its snapshot in the local hub cache when there is one (this is how the
    tests stand in for hub names offline), else streamed from the hub when online.

    Raises:
        DraftkitError: the source is missing, unreadable or empty (one line).
    """
    from draftkit.data import read_jsonl, read_rows
    from draftkit.errors import DataError

    if _is_local(source):
        path = Path(source).expanduser()
        if path.suffix.lower() == ".jsonl" and path.is_file():  # the head only: big files stay cheap
            rows = read_jsonl(path, limit=n)
            if not rows:
                raise DataError(f"{path} is empty: it has no rows")
            if not all(isinstance(r, dict) for r in rows):
                raise DataError(f"{path}: every row must be a JSON object")
            return rows
        return read_rows(source, split=split)[:n]
    name, _, config = source.partition(":")
    files = _cached_dataset_files(name, config or None, split)
    if files:
        return _read_head(files, n)
    from draftkit.hub import offline_if_unreachable, unreachable_hint

    if _offline() or offline_if_unreachable():
        raise DataError(f"hub dataset {source} (split {split}) is not in the local hub cache and {unreachable_hint()}: "
                        "download it first, or name a local file")
    try:
        import datasets

        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
        rows = [dict(r) for _, r in zip(range(n), stream, strict=False)]
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"hub dataset {source} (split {split}) cannot be read: {first_line(exc)[:200]}") from None
    if not rows:
        raise DataError(f"hub dataset {source} split {split} is empty")
    return rows


def _cached_dataset_files(name: str, config: str | None, split: str) -> list[Path]:
    """Data files of ``split`` in the local hub-cache snapshot of dataset ``name`` (none when not cached)."""
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no huggingface_hub): the caller decides
        return []
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in HUB_FILE_SUFFIXES)
    if config:
        in_config = [f for f in files if config in f.relative_to(root).parts[:-1]]
        files = in_config or files

    def split_of(f: Path) -> set[str]:
        rel = f.relative_to(root)
        return {rel.name.split("-")[0].split(".")[0], *rel.parts[:-1]}

    return [f for f in files if split in split_of(f)]


def _read_head(files: list[Path], n: int) -> list[dict[str, Any]]:
    from draftkit.data import read_rows

    f = files[0]
    if f.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(f).iter_batches(batch_size=n), None)
        return batch.to_pylist() if batch is not None else []
    return read_rows(str(f))[:n]


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


class _Collector:
    def __init__(self, environment: bool = True) -> None:
        self.problems: list[Problem] = []
        self.environment = environment  # also check this machine (extras installed, device)

    def run(self, where: str, fn, *args, **kwargs) -> Any:
        """Call ``fn``; a user-facing error becomes a problem at ``where`` (None returned)."""
        try:
            return fn(*args, **kwargs)
        except DraftkitError as exc:
            self.add(where, first_line(exc))
        except (OSError, ValueError) as exc:
            self.add(where, first_line(exc))
        return None

    def add(self, where: str, message: str) -> None:
        p = Problem(where, message)
        if p not in self.problems:
            self.problems.append(p)


def preflight(recipe, *, environment: bool = True) -> list[Problem]:
    """Every problem that would stop ``recipe`` (none: it can run). Reads configs, tokenizers and a few rows.

    Args:
        environment: also check this machine (device, installed extras, memory); ``False`` checks the
            recipe alone, for a recipe meant for another machine (``recipes validate --portable``).
    """
    from draftkit.registry import stages

    c = _Collector(environment)
    load = recipe.header.load
    trust = load.trust_remote_code
    registry = stages()
    hf_config = c.run("model", check_model, recipe.header.model, trust_remote_code=trust)
    if environment:
        _check_device(c, load.device)
    configs: dict[int, Any] = {}  # the config each stage's output has (a from: stage starts from that one's)
    for step in recipe.steps:
        where = f"stages[{step.index}].{step.name}"
        entry = registry[step.name]
        if step.source is not None:
            from draftkit.branches import source_step

            src = c.run(f"stages[{step.index}].from", source_step, recipe, step)
            hf_config = configs.get(src.index) if src is not None else None
        if entry.preflight is not None:  # the stage's own recipe-level checks, registered with it
            entry.preflight(c, where, recipe, step, hf_config)
        if entry.after is not None and hf_config is not None:
            hf_config = entry.after(hf_config, step.config)
        configs[step.index] = hf_config
    if environment and not c.problems:
        from draftkit.estimates import estimate_memory_bytes

        _check_memory(c, estimate_memory_bytes(recipe), load.device)
    return c.problems


def check_recipe(recipe, *, environment: bool = True) -> None:
    """:func:`preflight`, raising :class:`PreflightError` (exit 2) listing every problem."""
    problems = preflight(recipe, environment=environment)
    if problems:
        raise PreflightError(problems)


def check_calibrated(c: _Collector, where: str, recipe, step, hf_config) -> None:
    """A calibrated stage (prune, sparsify): its settings fit the model as it will be, and its calibration data
    reads (none is read by a run with no forward: explicit layers, the last blocks, magnitude)."""
    from draftkit.data import DEFAULT_CALIB
    from draftkit.registry import stages

    cfg = step.config
    check = stages()[step.name].check
    if hf_config is not None and check is not None:
        c.run(where, check, hf_config, cfg)
    forward = getattr(cfg, "method", None) not in ("last", "magnitude") and getattr(cfg, "drop", None) is None
    if forward:
        c.run(f"{where}.calib.path", sample_rows, cfg.calib.path or DEFAULT_CALIB, cfg.calib.split)


def check_distill(c: _Collector, where: str, recipe, step, hf_config) -> None:
    """The distill stage's recipe checks: its teacher, dataset columns and engine."""
    cfg, trust, device = step.config, recipe.header.load.trust_remote_code, recipe.header.load.device
    environment = c.environment
    from draftkit.data import detect_columns

    if cfg.regenerate:
        if cfg.teacher is None:
            c.add(f"{where}.teacher", "regenerating the data needs a teacher (or set regenerate: false for plain SFT)")
        else:
            c.run(f"{where}.teacher", check_model, cfg.teacher, trust_remote_code=trust or cfg.teacher_trust_remote_code)
    if cfg.dataset is None:
        c.add(f"{where}.dataset", "a dataset is required")
    else:
        rows = c.run(f"{where}.dataset", sample_rows, cfg.dataset, cfg.split)
        if rows:
            try:
                mapping = detect_columns(rows, cfg.column_map())
                if "text" in mapping:
                    found = sorted(set().union(*(r.keys() for r in rows)))
                    c.add(f"{where}.dataset", f"distillation needs prompt and response columns, found only plain "
                                              f"text; columns found: {found}; set columns: prompt=COL,response=COL")
            except DraftkitError as exc:
                c.add(f"{where}.columns" if cfg.columns else f"{where}.dataset", first_line(exc))
    if cfg.lora_alpha is not None and not cfg.lora_rank:
        c.add(f"{where}.lora_alpha", "lora_alpha is set but lora_rank is 0 (full fine-tuning): set lora_rank or drop lora_alpha")
    if cfg.engine == "vllm" and device == "cpu":
        c.add(f"{where}.engine", "the vllm engine needs a GPU, but load.device is cpu: set load.device: cuda or engine: hf")
    if environment and cfg.engine == "vllm" and cfg.regenerate and importlib.util.find_spec("vllm") is None:
        c.add(f"{where}.engine", "engine vllm needs the vllm extra: pip install 'draftkit[vllm]' (or engine: hf)")
    if cfg.tensor_parallel > 1 and cfg.engine != "vllm":
        c.add(f"{where}.tensor_parallel", "tensor_parallel > 1 needs engine: vllm")


def check_merge(c: _Collector, where: str, recipe, step, hf_config) -> None:
    """The merge stage's recipe checks: at least two models, each an earlier stage or a model that exists."""
    trust = recipe.header.load.trust_remote_code
    from draftkit.branches import stage_models

    if len(step.config.models) < 2:
        c.add(f"{where}.models", "a merge needs at least two models: earlier stages (name, index or folder) or paths")
        return
    models = c.run(f"{where}.models", stage_models, recipe, step, recipe.header.output)
    for ref, model in zip(step.config.models, models, strict=True) if models else ():
        if model == str(ref):  # not a stage of this recipe: a model that must exist now
            c.run(f"{where}.models", check_model, model, trust_remote_code=trust)
    if step.config.base:
        c.run(f"{where}.base", check_model, step.config.base, trust_remote_code=trust)


def check_eval(c: _Collector, where: str, recipe, step, hf_config) -> None:
    """The eval stage's recipe checks: its files, baseline and tasks."""
    cfg, trust, environment = step.config, recipe.header.load.trust_remote_code, c.environment
    from draftkit.evaluate import LOCAL_TASKS

    for field in ("ppl", "arith_data", "include_path"):
        path = getattr(cfg, field)
        if path and not Path(path).exists():
            c.add(f"{where}.{field}", f"{path} does not exist")
    if cfg.baseline:
        c.run(f"{where}.baseline", check_model, cfg.baseline, trust_remote_code=trust)
    hub_tasks = [t for t in cfg.tasks if t not in LOCAL_TASKS]
    if hub_tasks and environment:
        from draftkit.evaluate.lmeval import check_tasks

        c.run(f"{where}.tasks", check_tasks, hub_tasks, cfg.include_path, local=LOCAL_TASKS)


def check_spec(c: _Collector, where: str, recipe, step, hf_config) -> None:
    """The spec stage's recipe checks: its target, prompts and the two tokenizers."""
    cfg, trust = step.config, recipe.header.load.trust_remote_code
    draft = recipe.header.model  # no stage changes the tokenizer
    from draftkit.evaluate.spec import PROMPT_COLUMNS

    target_cfg = c.run(f"{where}.target", check_model, cfg.target, trust_remote_code=trust)
    rows = c.run(f"{where}.prompts", sample_rows, cfg.prompts, cfg.split)
    if rows:
        present = set().union(*(r.keys() for r in rows))
        if cfg.column is not None and cfg.column not in present:
            c.add(f"{where}.column", f"{cfg.prompts} has no column {cfg.column!r}; columns found: {sorted(present)}")
        elif cfg.column is None and not any(col in present for col in PROMPT_COLUMNS):
            c.add(f"{where}.prompts", f"{cfg.prompts} has no prompt column: found {sorted(present)}; set column: NAME "
                                      f"or use one of {', '.join(PROMPT_COLUMNS)}")
    if target_cfg is None:
        return
    try:
        draft_tok = _tokenizer(draft, trust)
        target_tok = _tokenizer(cfg.target, trust)
    except DraftkitError as exc:
        c.add(f"{where}.target", f"tokenizer: {first_line(exc)}")
        return
    same = len(draft_tok) == len(target_tok) and draft_tok.get_vocab() == target_tok.get_vocab()
    if not same and cfg.mode == "same":
        c.add(f"{where}.mode", f"mode: same needs one vocabulary, but the draft's tokenizer ({len(draft_tok)} tokens) "
                               f"differs from the target's ({len(target_tok)}): use mode: text or auto")


def _check_device(c: _Collector, device: str) -> None:
    import torch

    from draftkit.checkpoint import check_device

    if c.run("load.device", check_device, device) is None:
        return
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        c.add("load.device", "cuda was asked for but this machine has no CUDA GPU: use cpu or auto")
    elif kind == "mps" and not torch.backends.mps.is_available():
        c.add("load.device", "mps was asked for but is not available here: use cpu or auto")


def _device_memory(device: str) -> tuple[int | None, str]:
    import torch

    if device.startswith(("cuda", "auto")) and torch.cuda.is_available():
        idx = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        return torch.cuda.get_device_properties(idx).total_memory, f"GPU {idx}"
    import psutil

    return int(psutil.virtual_memory().total), "this machine's RAM"


def _check_memory(c: _Collector, estimates: dict[int, int], device: str) -> None:
    total, what = _device_memory(device)
    if not total or not estimates:
        return
    worst = max(estimates, key=lambda i: estimates[i])
    if estimates[worst] > total:
        c.add("load.device", f"the largest stage (stage {worst}) needs about {estimates[worst] / 2**30:.1f} GiB, "
                             f"more than {what} ({total / 2**30:.1f} GiB)")

