"""The search's orchestration: build each candidate (sharing the steps before it), measure it, judge the frontier.

Progress lives in the work folder, recorded the way a recipe run records its stages: ``manifest.json`` holds one
entry per step and per measurement with its fingerprint (:func:`draftkit.fingerprint.stage_fingerprint`: the
settings, the execution options, the content of every input), and an entry is reused exactly when a recipe's
stage would be (:func:`draftkit.fingerprint.decide`). A killed search therefore continues with the next candidate,
and a changed setting rebuilds only what depends on it.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from draftkit import console
from draftkit.atomic import atomic_write_json
from draftkit.memory import collect_released_models
from draftkit.search.config import SearchConfig
from draftkit.search.grid import REGEN, TARGET, Candidate, frontier, mine, plan
from draftkit.search.procs import Procs, spread, step_lock

MANIFEST = "manifest.json"


class Ledger:
    """The work folder's manifest (the pipeline's format), shared by the search's processes under a lock."""

    def __init__(self, work: Path, load: dict[str, Any]):
        self.work, self.load = work, load
        self.path = work / MANIFEST

    def read(self) -> dict[str, Any]:
        import json

        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"stages": {}}

    def get(self, key: str) -> dict[str, Any]:
        return self.read()["stages"].get(key, {})

    def put(self, key: str, **fields: Any) -> None:
        with step_lock(self.work, "manifest"):
            data = self.read()
            data["stages"][key] = {**data["stages"].get(key, {}), **fields}
            atomic_write_json(self.path, data)

    def fingerprint(self, stage: str, config: dict[str, Any], input_id: str, previous: str | None):
        from draftkit.fingerprint import stage_fingerprint

        return stage_fingerprint(stage=stage, config=config, load=self.load, input_id=input_id, previous=previous)

    def reusable(self, key: str, fp: str, parts: dict[str, Any], out: Path) -> tuple[bool, str]:
        from draftkit.fingerprint import decide

        return decide(out, self.get(key), fp, parts)

    def record(self, key: str, stage: str, fp: str, parts: dict[str, Any], work):
        """Run ``work()`` as entry ``key``: running, then done with its report (or failed/interrupted)."""
        self.put(key, stage=stage, fingerprint=fp, parts=parts, status="running",
                 started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        t0 = time.perf_counter()
        try:
            report = work()
        except BaseException as exc:
            self.put(key, status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                     seconds=round(time.perf_counter() - t0, 3), error=f"{type(exc).__name__}: {str(exc)[:200]}")
            raise
        self.put(key, status="done", seconds=round(time.perf_counter() - t0, 3), report=report)
        return report


class Search:
    def __init__(self, target, tokenizer, cfg: SearchConfig, *, target_name: str, work: Path, procs: Procs):
        from draftkit.compute import current
        from draftkit.distill.rows import ROWS_FILE
        from draftkit.fingerprint import data_identity, model_identity

        self.target, self.tok, self.cfg, self.name, self.work, self.procs = target, tokenizer, cfg, target_name, work, procs
        self.device = next(target.parameters()).device
        self.trust = bool(getattr(cfg, "_trust_remote_code", False))
        self.steps, self.cands = plan(cfg, target=target_name, rows=str(work / "regen" / ROWS_FILE))
        from draftkit.compute import resolve_compute

        choice = current()
        # the user's setting (auto or a dtype): the steps build in the search's own choice, the measurements run in
        # the one ``spec`` would take (float32 under auto: greedy verification must stay lossless)
        setting = choice.name if choice is not None and choice.why == "asked" else "auto"
        self.measure_compute = resolve_compute(setting, self.device, stage="spec") if choice is not None else None
        self.load = {"dtype": str(next(target.parameters()).dtype).removeprefix("torch."),
                     "compute": setting, "device": self.device.type}
        self.ledger = Ledger(work, self.load)
        self.target_id = model_identity(target_name)
        self.fps: dict[str, str] = {}
        self.ready: set[str] = set()
        self._sets = None
        self.measure_cfg = {"target": target_name, "prompts": cfg.prompts, "prompt_limit": cfg.prompt_limit,
                            "more_prompts": cfg.more_prompts and data_identity(cfg.more_prompts), "k": cfg.k,
                            "max_new_tokens": cfg.max_new_tokens, "chat": cfg.chat}

    # ---- steps ---------------------------------------------------------------------------------

    def out_of(self, sid: str) -> Path:
        return self.work / ("regen" if sid == REGEN else f"steps/{sid}")

    def source_path(self, inp: str) -> str:
        if inp == TARGET:
            return self.name
        if inp.startswith("base:"):
            return self.cfg.bases[int(inp[5:])]
        return str(self.out_of(inp))

    def source_id(self, inp: str | None) -> tuple[str, str | None]:
        """(input identity, previous fingerprint) of a step reading ``inp``."""
        from draftkit.fingerprint import model_identity

        if inp is None:
            return "none", None
        if inp == TARGET:
            return self.target_id, None
        if inp.startswith("base:"):
            return model_identity(self.source_path(inp)), None
        return f"step {inp}", self.fps[inp]

    def ensure(self, sid: str) -> Path:
        """The output of step ``sid``, built now unless an earlier run (or another process) built it."""
        step = self.steps[sid]
        for dep in (*step.after, *([step.input] if step.input in self.steps else [])):
            self.ensure(dep)
        out = self.out_of(sid)
        if sid in self.ready:
            return out
        input_id, previous = self.source_id(step.input)
        fp, parts = self.ledger.fingerprint(step.stage, step.config.model_dump(mode="json", exclude={"work_dir"}),
                                            input_id, previous)
        self.fps[sid] = fp
        with step_lock(self.work, sid):
            reuse, why = self.ledger.reusable(sid, fp, parts, out)
            if not reuse:
                console.info(f"[bold]search[/bold]: {sid} ({why})")
                self.ledger.record(sid, step.stage, fp, parts, lambda: self.build(step, out))
                collect_released_models()  # the step's model and optimizer: freed before the next step
        self.ready.add(sid)
        return out

    def build(self, step, out: Path) -> dict[str, Any]:
        from draftkit.checkpoint import load_model_and_tokenizer, save_model
        from draftkit.compute import load_dtype
        from draftkit.provenance import make_provenance

        if step.id == REGEN:
            from draftkit.distill import regenerate

            rep = regenerate(step.config, out, device=self.device, dtype=load_dtype() or "auto",
                             trust_remote_code=self.trust, restart_stale=True)
            return {k: rep.get(k) for k in ("rows", "accepted_rows", "acceptance_rate", "generate_seconds",
                                            "new_tokens", "tokens_per_second") if k in rep}
        if step.input == TARGET:
            model, tok = copy.deepcopy(self.target), self.tok
        else:
            model, tok = load_model_and_tokenizer(self.source_path(step.input), dtype="auto", device=str(self.device),
                                                  trust_remote_code=self.trust and step.input.startswith("base:"))
        cfg = step.config
        from draftkit.registry import stage as registered

        run = registered(step.stage).run  # the stage's function, as it is registered (draftkit/registry.py)
        if "work_dir" in type(cfg).model_fields:  # a resumable stage (distill) works in the search's folder
            cfg = cfg.model_copy(update={"work_dir": str(self.work / "train" / step.id)})
        model, report = run(model, tok, cfg)
        provenance = make_provenance(stage=step.stage, source=self.source_path(step.input), facts=report,
                                     arguments={"config": step.config.model_dump(mode="json"), "search_step": step.id})
        save_model(model, tok, out, provenance=provenance, overwrite=True)
        keep = ("dropped_layers", "layers_after", "params_after", "sparsity", "overall_sparsity")
        facts = {k: report[k] for k in keep if k in report}
        if "train" in report:
            facts["train"] = {k: report["train"].get(k) for k in ("examples", "steps", "processes", "train_loss_first",
                                                                  "train_loss_last", "seconds")}
        return facts

    # ---- measurement ---------------------------------------------------------------------------

    def prompt_sets(self):
        """The prompt sets with the target's greedy reference, computed once (and kept in the work folder)."""
        from draftkit.compute import cast_for_compute, computing
        from draftkit.search.measure import PromptSet, read_prompt_set, target_reference

        if self._sets is not None:
            return self._sets
        sets = []
        n = self.cfg.max_new_tokens + self.cfg.k
        for i, path in enumerate(p for p in (self.cfg.prompts, self.cfg.more_prompts) if p):
            texts, ids = read_prompt_set(path, self.target, self.tok, limit=self.cfg.prompt_limit, chat=self.cfg.chat)
            config = {"prompts": path, "limit": self.cfg.prompt_limit, "chat": self.cfg.chat, "tokens": n}
            fp, parts = self.ledger.fingerprint("spec", config, self.target_id, None)
            key, out = f"reference-{i}", self.work / f"reference-{i}.json"
            with step_lock(self.work, key):
                if not self.ledger.reusable(key, fp, parts, out)[0]:
                    def work(ids=ids, out=out):
                        with computing(self.measure_compute), cast_for_compute(self.target):
                            ref = target_reference(self.target, ids, n)
                        atomic_write_json(out, {"reference": ref})
                        return {"prompts": len(ids)}

                    self.ledger.record(key, "spec", fp, parts, work)
            import json

            sets.append(PromptSet(path, texts, ids, json.loads(out.read_text())["reference"]))
        self._sets = sets
        return sets

    def draft_of(self, cand: Candidate) -> tuple[str | None, str, str | None]:
        """(draft folder or name, None for the target itself; input identity; previous fingerprint)."""
        if cand.steps:
            last = cand.steps[-1]
            return str(self.out_of(last)), f"step {last}", self.fps[last]
        if cand.base is not None:
            input_id, _ = self.source_id(cand.source)
            return cand.base, input_id, None
        return None, self.target_id, None

    def measure(self, cand: Candidate) -> dict[str, Any]:
        for sid in cand.steps:
            self.ensure(sid)
        path, input_id, previous = self.draft_of(cand)
        key = f"measure-{cand.name}"
        fp, parts = self.ledger.fingerprint("spec", self.measure_cfg, input_id, previous)
        reuse, why = self.ledger.reusable(key, fp, parts, self._existing(path))
        if reuse:
            return self.ledger.get(key)["report"]
        console.info(f"[bold]search[/bold]: measuring {cand.name} ({why})")
        try:
            return self.ledger.record(key, "spec", fp, parts, lambda: self._measure(cand, path))
        finally:
            collect_released_models()  # the draft and its casts

    def _existing(self, path: str | None) -> Path:
        """The folder whose presence a measurement's reuse needs: the draft's, or the work folder for the target
        itself and a base named by an alias or hub id."""
        return Path(path) if path and Path(path).exists() else self.work

    def _with_draft(self, path: str | None, fn):
        """``fn(draft, tokenizer)`` with the draft at ``path`` (the target when None) and the target in the
        measurements' compute dtype, as ``spec`` loads them."""
        from draftkit.checkpoint import load_model_and_tokenizer
        from draftkit.compute import cast_for_compute, computing, load_dtype

        with computing(self.measure_compute):
            if path is None:  # the target drafting for itself
                draft, dtok = self.target, self.tok
            else:
                draft, dtok = load_model_and_tokenizer(path, dtype=load_dtype() or "auto", device=str(self.device),
                                                       trust_remote_code=self.trust)
            with cast_for_compute(self.target), cast_for_compute(None if draft is self.target else draft):
                return fn(draft, dtok)

    def _measure(self, cand: Candidate, path: str | None) -> dict[str, Any]:
        from draftkit.evaluate.spec import SpecConfig
        from draftkit.search.measure import measure

        sets = self.prompt_sets()
        spec_cfg = SpecConfig(target=self.name, prompts=self.cfg.prompts, limit=self.cfg.prompt_limit, k=self.cfg.k,
                              max_new_tokens=self.cfg.max_new_tokens, chat=self.cfg.chat, check_lossless=False)
        res = self._with_draft(path, lambda d, t: measure(d, t, self.target, self.tok, sets, k=self.cfg.k,
                                                          max_new_tokens=self.cfg.max_new_tokens, eos=self.eos,
                                                          spec_cfg=spec_cfg))
        return {**res, "process": self.procs.rank}

    @property
    def eos(self) -> int | None:
        return self.tok.eos_token_id

    def engine(self, cand: Candidate, measured: dict[str, Any]) -> dict[str, Any]:
        from draftkit.search.measure import engine_speedup

        path, _, _ = self.draft_of(cand)
        k = measured.get("best_k") or self.cfg.k
        config = {**self.measure_cfg, "engine": self.cfg.speedup_engine, "k": k, "engine_prompts": self.cfg.engine_prompts,
                  "engine_repeats": self.cfg.engine_repeats}
        key = f"engine-{cand.name}"
        fp, parts = self.ledger.fingerprint("spec", config, f"measure-{cand.name}", self.ledger.get(f"measure-{cand.name}").get("fingerprint"))
        if self.ledger.reusable(key, fp, parts, self._existing(path))[0]:
            return self.ledger.get(key)["report"]
        console.info(f"[bold]search[/bold]: engine speedup of {cand.name} ({self.cfg.speedup_engine}, k={k})")
        ids = self.prompt_sets()[0].ids[: self.cfg.engine_prompts]
        return self.ledger.record(key, "spec", fp, parts, lambda: self._with_draft(path, lambda d, t: engine_speedup(
            d, t, self.target, self.tok, ids, k=k, max_new_tokens=self.cfg.max_new_tokens, eos=self.eos,
            repeats=self.cfg.engine_repeats)))

    # ---- the whole search ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        cands = self.cands
        console.info(f"search: {len(cands)} candidates from {len(self.steps)} shared steps"
                     + (f", process {self.procs.rank + 1} of {self.procs.world}" if self.procs.world > 1 else ""))
        self.prompt_sets()  # the target's reference, before the candidates (every process reads the one file)
        for cand in mine(cands, self.procs.rank, self.procs.world):
            self.measure(cand)
        self.procs.barrier()
        if not self.procs.main:
            return {"rank": self.procs.rank, "processes": self.procs.world, "candidates": []}
        for sid in self.steps:  # the fingerprints of steps other processes built
            if sid not in self.fps:
                self.ensure(sid)
        rows = []
        for cand in cands:
            res = self.measure(cand)  # another process's: read from the manifest
            path, _, _ = self.draft_of(cand)
            rows.append({**cand.describe(), "steps": list(cand.steps), "draft": path or self.name, **res})
        points = [(r["c"], r["mal_per_step"] or 0.0) for r in rows]
        front = set(frontier(points))
        for i, r in enumerate(rows):
            r["frontier"] = i in front
            r["engine"] = None
            if i in front and self.cfg.speedup_engine != "none" and (r["steps"] or r["base"]):  # not the target
                r["engine"] = self.engine(cands[i], r)
        # the target drafting for itself is a reference point (MAL k+1 at the target's cost), never the draft to serve
        ranked = [r for r in rows if r.get("predicted_speedup") is not None and (r["steps"] or r["base"])]
        best = max(ranked, key=lambda r: r["predicted_speedup"]) if ranked else None
        counts: dict[str, int] = {}
        for step in self.steps.values():
            counts["regenerate" if step.id == REGEN else step.stage] = counts.get(
                "regenerate" if step.id == REGEN else step.stage, 0) + 1
        v_k = [r["v"][self.cfg.k] for r in rows if r.get("v") and len(r["v"]) > self.cfg.k]
        return {
            "target": self.name,
            "load": self.load,
            "k": self.cfg.k,
            "prompts": len(self.prompt_sets()[0].ids),
            "more_prompts": self.cfg.more_prompts,
            "processes": self.procs.world,
            "candidates": rows,
            "frontier": [rows[i]["name"] for i in sorted(front, key=lambda i: points[i])],
            "best": best["name"] if best else None,
            "best_predicted_speedup": best["predicted_speedup"] if best else None,
            "pays_off": bool(best and best["predicted_speedup"] > 1),
            "v_k": statistics.median(v_k) if v_k else None,
            "shared_steps": counts,
            "regeneration": self.ledger.get(REGEN).get("report") if REGEN in self.steps else None,
            "work_dir": str(self.work),
            "search_seconds": round(time.perf_counter() - t0, 3),
        }


def run_search(target, tokenizer, cfg: SearchConfig, *, target_name: str) -> dict[str, Any]:
    """Build and measure every candidate of ``cfg`` for ``target`` (loaded as ``target_name``); the report.

    Progress and the drafts are kept in ``cfg.work_dir``; without one, in a temporary folder that the report
    names (``work_dir``, ``work_is_temporary``): :func:`draftkit.search.output.write_search` moves the drafts out of
    it and removes it."""
    temp = cfg.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="draftkit-search-")) if temp else Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    with spread(cpu=next(target.parameters()).device.type == "cpu") as procs:
        if procs.world > 1 and temp:
            from draftkit.errors import InvalidInputError

            raise InvalidInputError("a search over several processes needs a work_dir they share: pass --work-dir")
        if procs.world == 1:  # a killed run's half-written models (never a finished one); others may be writing theirs
            import shutil

            for stale in (work / "steps").glob(".*.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        if procs.world > 1 and next(target.parameters()).device.type == "cuda":
            target.to(f"cuda:{procs.local_rank}")
        report = Search(target, tokenizer, cfg, target_name=target_name, work=work, procs=procs).run()
    report["work_is_temporary"] = temp
    return report
