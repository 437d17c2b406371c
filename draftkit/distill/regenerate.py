"""Step 1 of self-data distillation: the teacher rewrites each row's response (the driver).

Orchestration only: the rows and the rows file live in :mod:`draftkit.distill.rows`, the engines in
:mod:`draftkit.distill.engines`, and the prompt, answer extraction and acceptance rule in
:mod:`draftkit.distill.templates`. The rows file is appended to as rows finish, so an interruption keeps
every finished row and a re-run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from draftkit import console
from draftkit.atomic import atomic_write_json, atomic_write_text
from draftkit.distill.config import DistillConfig
from draftkit.distill.engines import Generation, HFEngine, VLLMEngine, check_vllm
from draftkit.distill.rows import (
    REPORT_FILE,
    ROWS_FILE,
    Example,
    append_rows,
    has_chat_template,
    load_examples,
    read_done_rows,
    teacher_prompt_ids,
)
from draftkit.distill.templates import accept, template_hash
from draftkit.errors import DataError, InvalidInputError
from draftkit.textcap import TextCap

PART_GLOB = "rows.part-*.jsonl"

__all__ = ["REPORT_FILE", "ROWS_FILE", "Example", "Generation", "HFEngine", "VLLMEngine", "append_rows",
           "has_chat_template", "load_examples", "read_done_rows", "regenerate", "teacher_prompt_ids"]

# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def regenerate(cfg: DistillConfig, out_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: str = "auto", trust_remote_code: bool = False, teacher=None, processes=None,
               restart_stale: bool = False) -> dict[str, Any]:
    """Regenerate ``cfg.dataset`` with ``cfg.teacher`` into ``out_dir/rows.jsonl`` (resuming if present).

    Args:
        teacher: an already loaded ``(model, tokenizer)`` to use instead of loading ``cfg.teacher``.
        processes: under ``accelerate launch``/``torchrun``, accelerate's ``PartialState``: every process
            regenerates every N-th row still to do into its own ``rows.part-R.jsonl`` (its own teacher on its
            own device), then the main process merges the parts into ``rows.jsonl`` in dataset order.
        restart_stale: rows made by another teacher (name or weights), template or generation settings are
            deleted with a warning and regenerated (a work folder); by default they are an error.

    Returns:
        The regeneration report (also written to ``out_dir/regenerate.json``).
    """
    if cfg.teacher is None:
        raise InvalidInputError("a teacher is needed to regenerate the data: pass --teacher")
    if cfg.engine == "vllm":
        check_vllm()
    examples = load_examples(cfg)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"{out_dir} exists and is not a directory: choose another output")
    rank, world = (processes.process_index, processes.num_processes) if processes is not None else (0, 1)
    path = out_dir / ROWS_FILE
    t_hash = template_hash(cfg.template)
    source = rows_source(cfg, dtype)
    done = read_done_rows(path) + [r for part in sorted(out_dir.glob(PART_GLOB)) for r in read_done_rows(part)]
    stale = _stale(done[0], cfg, t_hash, source) if done else None
    if world > 1:
        processes.wait_for_everyone()  # every process has read the finished rows before any writes
    if stale and not restart_stale:
        raise InvalidInputError(f"{path} holds rows that {stale}: choose another output or pass --overwrite")
    if stale:
        if rank == 0:
            console.warn(f"discarding the {len(done)} rows in {out_dir}: they {stale}; regenerating them")
            for f in [path, out_dir / REPORT_FILE, *out_dir.glob(PART_GLOB)]:
                f.unlink(missing_ok=True)
        if world > 1:
            processes.wait_for_everyone()
        done = []
    done_ids = {r["id"] for r in done}
    todo = [e for e in examples if e.id not in done_ids]
    mine = todo[rank::world]
    stats = {"new_tokens": 0, "seconds": 0.0}
    if done and rank == 0:
        console.info(f"resuming: {len(done_ids)} rows already in {out_dir} (same teacher and settings), "
                     f"{len(todo)} to go")
    if mine:
        target = path if world == 1 else out_dir / f"rows.part-{rank:05d}.jsonl"
        _generate_rows(cfg, mine, target, {"template_hash": t_hash, **source}, stats, device=device, dtype=dtype,
                       trust_remote_code=trust_remote_code, teacher=teacher)
    if world > 1:
        processes.wait_for_everyone()
    if rank == 0 and (todo or any(out_dir.glob(PART_GLOB))):  # leave one file, in dataset order
        merged = {r["id"]: r for r in read_done_rows(path)}
        parts = sorted(out_dir.glob(PART_GLOB))
        merged.update({r["id"]: r for part in parts for r in read_done_rows(part)})
        if merged:
            ordered = sorted(merged.values(), key=lambda r: r["index"])
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
        for part in parts:
            part.unlink()
    if world > 1:
        processes.wait_for_everyone()
    if not path.exists():
        raise DataError(f"no rows were generated into {path}")
    if world > 1:  # the throughput of every process together
        stats = {k: float(v) for k, v in stats.items()}
        totals = processes_sum(processes, [stats["new_tokens"], stats["seconds"]])
        stats = {"new_tokens": int(totals[0]), "seconds": totals[1] / world}
    all_rows = read_done_rows(path)
    wanted = {e.id for e in examples}
    rows = [r for r in all_rows if r["id"] in wanted]
    if len(rows) < len(all_rows):
        console.warn(f"{path} also holds {len(all_rows) - len(rows)} rows of another selection of the data "
                     "(e.g. a larger --limit); they are kept, and training on this file uses them too")
    accepted = sum(r["accepted"] for r in rows)
    reasons: dict[str, int] = {}
    for r in rows:
        if not r["accepted"]:
            key = r["reason"].split(" (")[0] if r["reason"].startswith("mentions") else r["reason"]
            key = "final answer differs" if key.startswith("final answer ") and "!=" in key else key
            reasons[key] = reasons.get(key, 0) + 1
    report = {
        "rows_file": str(path),
        "rows": len(rows),
        "generated_now": len(todo),
        "resumed": len(done_ids & wanted),
        "accepted": accepted,
        "acceptance_rate": round(accepted / len(rows), 4) if rows else 0.0,
        "rejected_reasons": reasons,
        "teacher": cfg.teacher,
        "engine": cfg.engine,
        "template_hash": t_hash,
        "new_tokens": stats["new_tokens"],
        "generate_seconds": round(stats["seconds"], 3),
        "tokens_per_second": round(stats["new_tokens"] / stats["seconds"], 2) if stats["seconds"] else None,
    }
    if rank == 0:
        atomic_write_json(out_dir / REPORT_FILE, report)
    _check_acceptance(report, cfg, path)
    return report


def processes_sum(processes, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes."""
    from accelerate.utils import reduce

    t = torch.tensor(values, dtype=torch.float64, device=processes.device)
    return reduce(t, reduction="sum").tolist()


LOW_ACCEPTANCE = 0.2  # below this share of accepted rewrites, the run is probably misconfigured
MIN_ROWS_TO_JUDGE = 20  # on fewer rows, none accepted is a warning only (too few to tell a broken set-up)


def _check_acceptance(report: dict, cfg: DistillConfig, path: Path) -> None:
    """Warn loudly when few rewrites were accepted, with the likely fix; none accepted is an error."""
    rows, accepted = report["rows"], report["accepted"]
    if not rows or not cfg.accept_filter or accepted / rows >= LOW_ACCEPTANCE:
        return
    reasons = report["rejected_reasons"]
    top = max(reasons, key=reasons.get) if reasons else "?"
    if top.startswith("truncated"):
        fix = "raise --max-new-tokens so the teacher can finish its answers"
    elif "{reference}" in cfg.template:
        fix = ("the teacher probably cannot follow the rewrite prompt: try --template instruction-only (it answers the "
               "instruction alone), or a teacher that follows instructions")
    else:
        fix = "check that the teacher is the right model for this data (or pass --no-accept-filter)"
    msg = (f"the teacher's response was accepted on {accepted} of {rows} rows ({accepted / rows:.1%}); most rejections: "
           f"{top!r} ({reasons.get(top, 0)} rows); {fix}")
    if accepted == 0 and rows >= MIN_ROWS_TO_JUDGE:
        raise DataError(f"{msg}; the rows are kept in {path}")
    console.warn(msg)


def rows_source(cfg: DistillConfig, dtype: str | None = None) -> dict[str, Any]:
    """What the rows depend on besides the data and template: the teacher's content and the generation settings,
    the dtype the teacher runs in among them (``dtype``; by default the one distill loads it in)."""
    from draftkit.compute import load_dtype
    from draftkit.fingerprint import model_identity

    gen: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                           "accept_filter": cfg.accept_filter,
                           "dtype": dtype or cfg.teacher_dtype or load_dtype() or "auto"}
    if cfg.temperature > 0:
        gen |= {"top_p": cfg.top_p, "seed": cfg.seed}
    return {"teacher_identity": model_identity(str(cfg.teacher)), "generation": gen}


def _stale(row: dict[str, Any], cfg: DistillConfig, t_hash: str, source: dict[str, Any]) -> str | None:
    """Why a finished row cannot be reused by this run (None when it can)."""
    if row.get("teacher") != cfg.teacher:
        return f"were made by teacher {row.get('teacher')!r} (this run's is {cfg.teacher!r})"
    if row.get("template_hash") != t_hash:
        return "were made with another template"
    if "teacher_identity" not in row:
        return "were made by an older draftkit (no record of the teacher's weights and settings)"
    if row["teacher_identity"] != source["teacher_identity"]:
        return f"were made by another version of teacher {cfg.teacher!r} (its weights changed)"
    if row.get("generation") != source["generation"]:
        return f"were made with other generation settings ({row.get('generation')}; now {source['generation']})"
    return None


def _generate_rows(cfg: DistillConfig, todo: list[Example], path: Path, keys: dict[str, Any], stats: dict[str, Any], *,
                   device, dtype: str, trust_remote_code: bool, teacher) -> None:
    from draftkit.checkpoint import load_model_and_tokenizer, load_tokenizer

    if cfg.engine == "vllm":
        tok = teacher[1] if teacher else load_tokenizer(cfg.teacher, trust_remote_code=trust_remote_code)
    elif teacher is not None:
        model, tok = teacher
    else:
        model, tok = load_model_and_tokenizer(cfg.teacher, dtype=dtype, device=str(device), trust_remote_code=trust_remote_code)
    if not has_chat_template(tok):
        console.warn(f"teacher {cfg.teacher} has no chat template: using a plain 'User: ... Assistant:' prompt")
    cap = TextCap(tok, cfg.max_length, str(cfg.dataset))  # a prompt training can never use whole is cut as text
    prompts = [teacher_prompt_ids(tok, e, cfg.template, cap) for e in todo]
    cap.report()
    if cfg.engine == "vllm":
        engine = VLLMEngine(cfg.teacher, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, seed=cfg.seed, tensor_parallel=cfg.tensor_parallel, dtype=dtype,
                            trust_remote_code=trust_remote_code, max_model_len=cfg.max_model_len,
                            gpu_memory_utilization=cfg.gpu_memory_utilization)
    else:
        engine = HFEngine(model, tok, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                          temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    path.parent.mkdir(parents=True, exist_ok=True)  # only once the teacher has loaded
    keys = {**keys, **rows_source(cfg, dtype)}  # a hub teacher downloaded just now: its snapshot's commit is known only now
    buffer: list[dict[str, Any]] = []
    last_flush = time.perf_counter()
    t0 = time.perf_counter()
    try:
        with console.status_bar("regenerating", total=len(todo)) as bar:
            for group in engine.generate(prompts):
                for g in group:
                    buffer.append(_row(todo[g.pos], g, cfg, keys))
                    stats["new_tokens"] += g.new_tokens
                elapsed = time.perf_counter() - t0
                bar.update(len(group), f"{stats['new_tokens'] / max(elapsed, 1e-9):.1f} tok/s")
                if len(buffer) >= max(8, cfg.batch_size // 2) or time.perf_counter() - last_flush > 5.0:
                    append_rows(path, buffer)
                    buffer, last_flush = [], time.perf_counter()
    finally:  # on Ctrl-C or an error, the rows finished so far are kept
        stats["seconds"] += time.perf_counter() - t0
        append_rows(path, buffer)
        if isinstance(engine, VLLMEngine):
            engine.close()  # the GPU memory goes back before training starts


def _row(e: Example, g: Generation, cfg: DistillConfig, keys: dict[str, Any]) -> dict[str, Any]:
    text = g.text.strip()
    if cfg.accept_filter:
        ok, reason = accept(text, e.reference, finished=g.finished)
    else:
        ok, reason = (bool(text), "filter off" if text else "empty response")
    response = text if ok else e.reference
    return {
        "id": e.id,
        "index": e.index,
        "messages": [*e.prompt, {"role": "assistant", "content": response}],
        "prompt": e.instruction,
        "reference": e.reference,
        "teacher_response": text,
        "response": response,
        "accepted": ok,
        "reason": reason,
        "teacher": cfg.teacher,
        "engine": cfg.engine,
        "new_tokens": g.new_tokens,
        **keys,
    }


def regenerate_into(cfg, out: str | Path, *, overwrite: bool = False, device: str = "cpu", dtype: str = "auto",
                    trust_remote_code: bool = False) -> dict[str, Any]:
    """``distill regenerate``'s driver (moved here from ``draftkit/pipeline.py``): write the teacher's rows into ``out``, resuming a folder that holds them.

    Every check (output rules, the data's columns) runs before anything is deleted; with ``overwrite`` the
    new rows are written beside the old folder, which is replaced only once they are complete. The folder
    is locked for the duration.
    """
    from draftkit.atomic import atomic_dir, check_output_dir, config_paths
    from draftkit.errors import OutputExistsError
    from draftkit.lock import LOCK_FILE, folder_lock

    out = Path(out)
    inputs = (cfg.teacher, *config_paths(cfg))
    has_rows = out.is_dir() and (out / ROWS_FILE).is_file()
    non_empty = out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir())
    if not overwrite and non_empty and not has_rows:
        raise OutputExistsError(f"output {out} exists and holds no {ROWS_FILE}: pass --overwrite or choose another -o")
    # protections and containment for every case; replacing needs an empty or draftkit folder
    check_output_dir(out, overwrite=True, inputs=inputs) if (has_rows or not non_empty) else \
        check_output_dir(out, overwrite=overwrite, inputs=inputs)
    load_examples(cfg)  # the data is usable, before anything is touched
    kw = {"device": device, "dtype": dtype, "trust_remote_code": trust_remote_code}
    with folder_lock(out, "distill regenerate"):
        if not (overwrite and non_empty):
            return regenerate(cfg, out, **kw) | {"output": str(out)}
        with atomic_dir(out, overwrite=True) as tmp:
            with folder_lock(tmp, "distill regenerate"):
                report = regenerate(cfg, tmp, **kw)
            (tmp / LOCK_FILE).unlink(missing_ok=True)
        fixed = json.loads(json.dumps(report).replace(str(tmp), str(out)))
        if (out / REPORT_FILE).is_file():
            atomic_write_json(out / REPORT_FILE, json.loads((out / REPORT_FILE).read_text().replace(str(tmp), str(out))))
        return fixed | {"output": str(out)}
