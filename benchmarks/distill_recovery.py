#!/usr/bin/env python
"""Demo evidence for the distill stage: prune the demo teacher, then recover it two ways on the same
budget (same rows, steps, learning rate, batch and seed): plain SFT on the original responses, and
self-data distillation (SDD) on the teacher's regenerated responses.

Task accuracy is exact match of the answer after ``####`` on ``examples/tiny/data/test.jsonl``
(draftkit.evaluate.tasks.tiny_arith: greedy, chat template). Recovery ratio = accuracy / teacher accuracy;
gap recovered = (accuracy - pruned) / (teacher - pruned).

Writes ``benchmarks/results/distill_recovery.json``.

Usage::

    python benchmarks/distill_recovery.py --layers 2 --train-rows 2000
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from draftkit import console
from draftkit.atomic import atomic_write_json
from draftkit.checkpoint import load_model_and_tokenizer
from draftkit.data import CalibConfig
from draftkit.distill import DistillConfig
from draftkit.distill.templates import DEFAULT_TEMPLATE, INSTRUCTION_ONLY_TEMPLATE
from draftkit.evaluate.tasks import tiny_arith
from draftkit.provenance import versions
from draftkit.prune import PruneConfig
from draftkit.stages import run_stage

ROOT = Path(__file__).resolve().parent.parent


def accuracy(path: str, test: str, limit: int | None) -> dict:
    model, tok = load_model_and_tokenizer(path)
    t0 = time.perf_counter()
    res = tiny_arith(model, tok, data=test, limit=limit, batch_size=64, max_new_tokens=96)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=str(ROOT / "examples" / "tiny" / "teacher"))
    p.add_argument("--train", default=str(ROOT / "examples" / "tiny" / "data" / "train.jsonl"))
    p.add_argument("--test", default=str(ROOT / "examples" / "tiny" / "data" / "test.jsonl"))
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--layers", type=int, default=2, help="decoder blocks to drop")
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--template", choices=["default", "instruction-only"], default="instruction-only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/draftkit-distill-recovery")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill_recovery.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_start = time.perf_counter()

    console.info(f"pruning {args.layers} blocks of {args.teacher}")
    prune = run_stage("prune", args.teacher, PruneConfig(layers=args.layers, calib=CalibConfig(
        path=args.train, samples=64, seqlen=256)), out=work / "pruned")

    common = dict(dataset=args.train, limit=args.train_rows, epochs=args.epochs, lr=args.lr, train_batch_size=args.batch,
                  seed=args.seed, eval_fraction=0.02, max_new_tokens=96, batch_size=64, checkpoints=False)
    template = DEFAULT_TEMPLATE if args.template == "default" else INSTRUCTION_ONLY_TEMPLATE
    sft = run_stage("distill", str(work / "pruned"), DistillConfig(**common, regenerate=False, work_dir=str(work / "sft-work")),
                    out=work / "sft")
    sdd = run_stage("distill", str(work / "pruned"), DistillConfig(**common, teacher=args.teacher, template=template,
                                                                   work_dir=str(work / "sdd-work")), out=work / "sdd")

    acc = {}
    for name, path in [("teacher", args.teacher), ("pruned", work / "pruned"), ("sft", work / "sft"), ("sdd", work / "sdd")]:
        acc[name] = accuracy(str(path), args.test, args.test_limit)
        console.info(f"{name}: exact match {acc[name]['exact_match']:.4f}")
    t = acc["teacher"]["exact_match"]
    pr = acc["pruned"]["exact_match"]

    def ratios(x):
        return {"recovery_ratio": round(x / t, 4) if t else None,
                "gap_recovered": round((x - pr) / (t - pr), 4) if t != pr else None}

    regen = sdd["regenerate"]
    result = {
        "teacher": args.teacher,
        "task": "tiny-arith exact match (answer after ####), greedy, chat template",
        "test_rows": acc["teacher"]["n"],
        "pruned_layers": prune["dropped_layers"],
        "layers": f"{prune['layers_before']} -> {prune['layers_after']}",
        "budget": {"train_rows": args.train_rows, "epochs": args.epochs, "lr": args.lr, "train_batch_size": args.batch,
                   "steps": sft["train"]["steps"], "seed": args.seed, "schedule": "cosine, 3% warm-up, AdamW"},
        "sdd_template": args.template,
        "acceptance_rate": regen["acceptance_rate"],
        "rejected_reasons": regen["rejected_reasons"],
        "regenerate_seconds": regen["generate_seconds"],
        "regenerate_tokens_per_second": regen["tokens_per_second"],
        "accuracy": {k: round(v["exact_match"], 4) for k, v in acc.items()},
        "answer_parsed_rate": {k: round(v["answer_parsed_rate"], 4) for k, v in acc.items()},
        "pruned": ratios(pr),
        "sft": ratios(acc["sft"]["exact_match"]) | {"eval_loss": sft["train"]["eval_loss_after"],
                                                    "train_seconds": sft["train"]["seconds"]},
        "sdd": ratios(acc["sdd"]["exact_match"]) | {"eval_loss": sdd["train"]["eval_loss_after"],
                                                    "train_seconds": sdd["train"]["seconds"]},
        "torch_threads": args.threads,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "versions": versions(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"\n{'model':10s} {'exact match':>12s} {'recovery':>9s} {'gap recovered':>14s}")
    for name in ("teacher", "pruned", "sft", "sdd"):
        r = ratios(acc[name]["exact_match"])
        gap = "" if r["gap_recovered"] is None or name in ("teacher", "pruned") else f"{r['gap_recovered']:.3f}"
        print(f"{name:10s} {acc[name]['exact_match']:12.4f} {r['recovery_ratio'] or 0:9.3f} {gap:>14s}")
    print(f"SDD acceptance rate {regen['acceptance_rate']:.3f}; {sft['train']['steps']} steps each; written to {args.out}")


if __name__ == "__main__":
    main()
