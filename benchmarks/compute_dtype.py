#!/usr/bin/env python
"""bf16 against float32 compute, stage by stage: is the result the same, and how much faster is it?

For each model, the same stage runs twice, ``load.compute=float32`` and ``load.compute=bfloat16`` (everything
else equal, in this process, one after the other), and the benchmark records what the stage decides and its time:

* **prune** (angular, ``--prune-layers`` blocks): the chosen blocks and the largest block-distance difference;
* **sparsify** (SparseGPT 50%): the share of mask entries that differ, the mean relative layer error, and the
  held-out perplexity of both outputs, measured by one evaluator (float32, the same text for both);
* **spec** (greedy, k = 4): the float32-compute sparse draft against the dense model as target: MAL and lossless;
* **train** (distill's training on the data, ``precision`` fp32 against bf16-mixed: float32 master weights and
  AdamW state, bf16 autocast): eval loss before and after the same steps, training tokens/s.

Models: ``demo`` (the shipped tiny teacher with its own data) and ``smollm2`` (SmolLM2-135M-Instruct, the Q4_1
GGUF dequantized to a float32 folder, on GSM8K text: ``../shared/data/gsm8k``). Also the machine's matmul rate in
both dtypes. Writes ``benchmarks/results/compute_dtype.json``; run it under the bench lock (about 15 minutes on
the 2-core development machine)::

    flock /tmp/dk-bench.lock python benchmarks/compute_dtype.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DRAFTKIT_NO_PROGRESS", "1")
RESULTS = ROOT / "benchmarks" / "results" / "compute_dtype.json"
GSM8K = next((p / "shared" / "data" / "gsm8k" for p in ROOT.parents if (p / "shared" / "data" / "gsm8k").is_dir()),
             ROOT.parent / "shared" / "data" / "gsm8k")
DTYPES = ("float32", "bfloat16")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def matmul_rates(m: int = 4096, n: int = 2048, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of an [m, n] @ [n, n] product in each dtype (median of ``reps``)."""
    import torch

    out = {}
    for name in DTYPES:
        dt = getattr(torch, name)
        a, b = torch.randn(m, n, dtype=dt), torch.randn(n, n, dtype=dt)
        a @ b
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        out[name] = round(2 * m * n * n / statistics.median(times) / 1e9, 1)
    return out


def timed_stage(name: str, model: str, cfg, out: Path, compute: str) -> tuple[dict[str, Any], float]:
    from draftkit.stages import LoadConfig, run_stage

    t0 = time.perf_counter()
    report = run_stage(name, model, cfg, out=out, load=LoadConfig(compute=compute), overwrite=True)
    return report, round(time.perf_counter() - t0, 2)


def mask_difference(a: Path, b: Path) -> float:
    """Share of the decoder linears' mask entries (zero or not) that differ between two outputs."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    differ = total = 0
    for k, v in wa.items():
        if ".layers." in k and k.endswith("proj.weight"):
            differ += int(((v == 0) != (wb[k] == 0)).sum())
            total += v.numel()
    return differ / total


def heldout_ppl(path: Path, heldout, seqlen: int, max_tokens: int) -> float:
    """The one evaluator: float32 weights, float32 compute, the same text and windows for every output."""
    from draftkit.checkpoint import load_model_and_tokenizer
    from draftkit.evaluate.perplexity import perplexity

    model, tok = load_model_and_tokenizer(str(path), dtype="float32", device="cpu")
    return round(perplexity(model, tok, heldout, seqlen=seqlen, max_tokens=max_tokens)["perplexity"], 4)


def run_model(label: str, model: str, data: dict[str, Any], work: Path, args, res: dict[str, Any], save,
              parts: list[str]) -> None:
    from draftkit.data import CalibConfig
    from draftkit.distill import DistillConfig
    from draftkit.evaluate.spec import SpecConfig
    from draftkit.prune import PruneConfig
    from draftkit.sparsify import SparsifyConfig

    res["model"] = model
    calib = CalibConfig(path=str(data["calib"]), samples=data["samples"], seqlen=data["seqlen"])
    if "train" in parts:
        runs = {}
        for p in ("fp32", "bf16-mixed"):
            cfg = DistillConfig(dataset=str(data["train_rows"]), regenerate=False, limit=args.train_rows, epochs=1,
                                max_steps=args.train_steps, train_batch_size=data["train_batch"], lr=data["lr"],
                                max_length=data["train_len"], precision=p, checkpoints=False, eval_fraction=0.1,
                                seed=0)
            r, s = timed_stage("distill", model, cfg,
                               work / f"{label}-train-{p}", "auto")
            t = r["train"]
            runs[p] = {"eval_loss_before": t["eval_loss_before"], "eval_loss_after": t["eval_loss_after"],
                       "steps": t["steps"], "tokens_per_second": t.get("tokens_per_second"), "seconds": s,
                       "precision": t["precision"]}
            log(f"{label} train {p}: {runs[p]}")
        tps = [runs[p]["tokens_per_second"] for p in ("fp32", "bf16-mixed")]
        if all(tps):
            runs["speedup_bf16_mixed"] = round(tps[1] / tps[0], 3)
        res["train"] = runs
        save()
    if "prune" in parts:
        runs = {}
        for c in DTYPES:
            r, s = timed_stage("prune", model, PruneConfig(layers=data["prune_layers"], calib=calib),
                               work / f"{label}-prune-{c}", c)
            runs[c] = {"dropped_layers": r["dropped_layers"], "seconds": s,
                       "distances": [d["distance"] for d in r["block_distances"]]}
            log(f"{label} prune {c}: dropped {r['dropped_layers']} in {s}s")
        d32, d16 = runs["float32"].pop("distances"), runs["bfloat16"].pop("distances")
        res["prune"] = runs = {**runs, "same_blocks": runs["float32"]["dropped_layers"] == runs["bfloat16"]["dropped_layers"],
                        "max_distance_difference": round(max(abs(a - b) for a, b in zip(d32, d16, strict=True)), 6),
                        "smallest_distance_gap": round(sorted(d32)[1] - sorted(d32)[0], 6)}
        save()
    outs = {c: work / f"{label}-sparsify-{c}" for c in DTYPES}
    if "sparsify" in parts or "spec" in parts:
        runs = {}
        for c in DTYPES:
            cfg = SparsifyConfig(sparsity=0.5, calib=calib)
            r, s = timed_stage("sparsify", model, cfg, outs[c], c)
            runs[c] = {"seconds": s, "mean_rel_error": round(r["mean_rel_error"], 6)}
            log(f"{label} sparsify {c}: {s}s, mean rel error {r['mean_rel_error']:.5f}")
        for c in DTYPES:
            runs[c]["heldout_perplexity"] = heldout_ppl(outs[c], data["heldout"], data["ppl_seqlen"], args.ppl_tokens)
        runs["dense_heldout_perplexity"] = heldout_ppl(Path(data["dense_dir"]), data["heldout"], data["ppl_seqlen"],
                                                         args.ppl_tokens)
        runs["mask_entries_differing"] = round(mask_difference(outs["float32"], outs["bfloat16"]), 5)
        runs["time_ratio_bf16"] = round(runs["bfloat16"]["seconds"] / runs["float32"]["seconds"], 3)
        runs["perplexity_ratio_bf16"] = round(runs["bfloat16"]["heldout_perplexity"] / runs["float32"]["heldout_perplexity"], 4)
        res["sparsify"] = runs
        save()
        log(f"{label} sparsify: {runs}")
    if "spec" in parts:
        runs = {}
        for c in DTYPES:
            cfg = SpecConfig(target=model, prompts=str(data["prompts"]), limit=args.spec_prompts, k=4,
                             max_new_tokens=args.spec_tokens)
            r, s = timed_stage("spec", str(outs["float32"]), cfg, work / f"{label}-spec-{c}", c)
            runs[c] = {"mal": round(r["mal"], 4), "lossless": r["lossless"], "lossless_prompts": r["lossless_prompts"],
                       "prompts": r["prompts"], "target_forward_ms": r["target_forward_ms"], "seconds": s}
            log(f"{label} spec {c}: {runs[c]}")
        res["spec"] = runs
        save()
    return res


def table(result: dict[str, Any]) -> str:
    """The README's table, from the JSON."""
    rows = ["| model | stage | what is compared | float32 | bfloat16 | bf16 / fp32 time |", "|---|---|---|---:|---:|---:|"]
    for label, m in result.get("models", {}).items():
        if "prune" in m:
            p = m["prune"]
            rows.append(f"| {label} | prune | dropped blocks (max distance difference {p['max_distance_difference']:.2g}) | "
                        f"{p['float32']['dropped_layers']} | {p['bfloat16']['dropped_layers']} | "
                        f"{p['bfloat16']['seconds'] / p['float32']['seconds']:.2f} |")
        if "sparsify" in m:
            sp = m["sparsify"]
            rows.append(f"| {label} | sparsify | held-out perplexity (dense {sp['dense_heldout_perplexity']:.3f}; "
                        f"{100 * sp['mask_entries_differing']:.2f}% of mask entries differ) | "
                        f"{sp['float32']['heldout_perplexity']:.3f} | {sp['bfloat16']['heldout_perplexity']:.3f} | "
                        f"{sp['time_ratio_bf16']:.2f} |")
        if "spec" in m:
            sc = m["spec"]
            rows.append(f"| {label} | spec | MAL, lossless | {sc['float32']['mal']:.2f}, {sc['float32']['lossless']} | "
                        f"{sc['bfloat16']['mal']:.2f}, {sc['bfloat16']['lossless']} | "
                        f"{sc['bfloat16']['seconds'] / sc['float32']['seconds']:.2f} |")
        if "train" in m:
            t = m["train"]
            rows.append(f"| {label} | distill training (fp32 vs bf16-mixed) | eval loss after {t['fp32']['steps']} steps "
                        f"(before {t['fp32']['eval_loss_before']:.4f}) | {t['fp32']['eval_loss_after']:.4f} | "
                        f"{t['bf16-mixed']['eval_loss_after']:.4f} | {1 / t['speedup_bf16_mixed']:.2f} |")
    return "\n".join(rows)


def demo_data(work: Path) -> dict[str, Any]:
    from draftkit.resources import demo_data as folder
    from draftkit.resources import demo_teacher

    d = folder()
    return {"calib": d / "train.jsonl", "samples": 64, "seqlen": 256, "prune_layers": 2, "heldout": str(d / "test.jsonl"),
            "ppl_seqlen": 256, "dense_dir": demo_teacher(), "prompts": d / "test.jsonl", "train_rows": d / "train.jsonl",
            "train_batch": 16, "lr": 1e-3, "train_len": 256}


def smollm2_data(work: Path, args) -> dict[str, Any]:
    from benchmarks.sparsify_vs_llmcompressor import write_text

    calib, heldout = work / "calib.txt", work / "heldout.txt"
    write_text(GSM8K / "train.jsonl", calib, 3000)
    write_text(GSM8K / "test.jsonl", heldout, 400)
    return {"calib": calib, "samples": args.samples, "seqlen": 512, "prune_layers": 6, "heldout": str(heldout),
            "ppl_seqlen": 512, "prompts": GSM8K / "test.jsonl", "train_rows": GSM8K / "train.jsonl",
            "train_batch": 4, "lr": 2e-5, "train_len": 128}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="demo,smollm2")
    ap.add_argument("--parts", default="prune,sparsify,spec,train")
    ap.add_argument("--samples", type=int, default=16, help="SmolLM2 calibration samples of 512 tokens")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--spec-prompts", type=int, default=8)
    ap.add_argument("--spec-tokens", type=int, default=32)
    ap.add_argument("--train-rows", type=int, default=400)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="1: a loaded 2-core machine makes 2 threads wait on each other")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    args.parts = args.parts.split(",")
    os.environ["DRAFTKIT_THREADS"] = str(args.threads)

    import torch

    from draftkit.compute import cpu_flags, resolve_compute

    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.update(
        benchmark="compute_dtype",
        machine={"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                 "bf16_flags": sorted(f for f in cpu_flags() if "bf16" in f),
                 "auto": resolve_compute("auto", "cpu").line(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        settings={k: v for k, v in vars(args).items() if k != "out"},
    )
    t_start = time.perf_counter()
    result["matmul_gflops"] = matmul_rates()
    log(f"matmul GFLOP/s: {result['matmul_gflops']}")
    work = Path(tempfile.mkdtemp(prefix="dk-compute-"))

    def save() -> None:
        result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        result["loadavg_now"] = [round(x, 2) for x in os.getloadavg()]
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    try:
        models = result.setdefault("models", {})
        inputs: dict[str, tuple[str, dict[str, Any]]] = {}
        for label in args.models.split(","):
            if label == "demo":
                from draftkit.resources import demo_teacher

                inputs["demo"] = (str(demo_teacher()), demo_data(work))
            else:
                from benchmarks.sd2_smollm2 import ensure_target, find_gguf

                target = ensure_target(find_gguf(None), Path.home() / ".cache" / "draftkit" / "sd2" / "smollm2-135m-instruct")
                data = smollm2_data(work, args)
                data["dense_dir"] = target
                inputs["smollm2"] = (str(target), data)
        # training of every model first (the precision decision), then the compute-dtype stages
        for parts in ([p for p in args.parts if p == "train"], [p for p in args.parts if p != "train"]):
            for label, (model, data) in inputs.items():
                if parts:
                    run_model(label, model, data, work, args, models.setdefault(label, {}), save, parts)
                    models[label]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
                    save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
