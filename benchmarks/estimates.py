"""Printed memory estimate against measured peak RSS, per stage; and ``draftkit run`` against the same stages run
as commands.

    flock /tmp/dk-bench.lock .venv/bin/python benchmarks/estimates.py                 # both parts
    flock /tmp/dk-bench.lock .venv/bin/python benchmarks/estimates.py --only stages   # estimate vs peak only

Parts (every command is its own ``draftkit`` process; peak RSS is its VmHWM, see ``benchmarks/scale.py``):

1. ``stages``: a random float32 checkpoint with SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536, 9/3 heads,
   vocabulary 49152, tied), resident. Each stage at its default settings (only the data named), except where a
   default would take over half an hour on this 2-core machine: sparsify's default calibration (128 x 2048
   tokens) is cut to its ``--samples`` given in the row. The estimate is the ``host`` figure the command
   prints (``memory_estimate_gb`` in its JSON report). Target: within 25% of the peak.
2. ``recipe``: random bf16 checkpoints with Llama-3.2-1B's width and 4 and 8 layers (streamed by the ``auto``
   rule): ``prune --layers 2`` then Wanda 50% (8 x 128 tokens), as two commands and as one ``draftkit run``.
   Targets: the recipe's peak grows by at most 40 MB per added layer and is within 10% of the larger command's.

Run it under the bench lock (the command above); it records the load average at each command. Writes
``benchmarks/results/estimates.json``; ``--table`` prints the README's tables from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.scale import (  # noqa: E402
    LLAMA_1B,
    SMOL_135M,
    make_tokenizer_and_data,
    per_layer_growth,
    write_random_checkpoint,
)
from benchmarks.scale import run as run_command  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "estimates.json"


def measure(cmd: list[str]) -> dict:
    r = run_command(cmd, lock=False)  # the whole script runs under the bench lock
    est = r.get("estimate_gb") or {}
    host = est.get("host")
    line = r.get("stderr_estimate") or ""
    if host is None and "host " in line:  # distill prints its estimate; its report keeps it under "train"
        host = float(line.split("host ")[1].split()[0])
    peak_gb = r["peak_rss_mb"] * 2**20 / 1e9
    r["estimate_host_gb"] = host
    r["estimate_over_peak"] = round(host / peak_gb, 3) if host else None
    return r


def stage_rows(work: Path, tok: Path, data: Path, only: list[str], previous: dict) -> dict:
    smol = work / "smol135m"
    write_random_checkpoint(smol, SMOL_135M, None, tok, dtype=torch.float32)
    text = work / "ppl.txt"
    rows = [json.loads(line) for line in data.read_text().splitlines()[:400]]
    text.write_text("\n\n".join(r["question"] + " " + r["answer"] for r in rows))
    distill_rows = work / "distill.jsonl"
    distill_rows.write_text("".join(json.dumps({"prompt": r["question"], "response": r["answer"]}) + "\n"
                                    for r in rows[:32]))
    calib = ["--calib", str(data)]
    cases = {
        "prune --layers 6 (default calibration 64 x 1024)": ["prune", str(smol), "--layers", "6", *calib],
        "sparsify wanda 50% (16 x 2048)": ["sparsify", str(smol), "--method", "wanda", "--sparsity", "0.5", *calib,
                                           "--samples", "16"],
        "distill train (defaults, 32 rows)": ["distill", "train", str(smol), "--dataset", str(distill_rows)],
        "eval --ppl (defaults)": ["eval", str(smol), "--ppl", str(text)],
        "sparsify sparsegpt 50% (16 x 2048)": ["sparsify", str(smol), "--sparsity", "0.5", *calib, "--samples", "16"],

    }
    out = dict(previous)
    for name, cmd in cases.items():
        if only and not any(name.startswith(o) for o in only):
            continue
        o = work / "o"
        out[name] = measure([*cmd, "-o", str(o), "--overwrite"])
        shutil.rmtree(o, ignore_errors=True)
        print(name, json.dumps(out[name]), flush=True)
    shutil.rmtree(smol, ignore_errors=True)
    return out


def recipe_rows(work: Path, tok: Path, data: Path, depths: list[int]) -> dict:
    calib = {"path": str(data), "samples": 8, "seqlen": 128}
    rows = []
    for layers in depths:
        ckpt = work / f"llama1b-{layers}"
        size = write_random_checkpoint(ckpt, LLAMA_1B, layers, tok)
        row: dict = {"layers": layers, "checkpoint_gb": round(size / 1e9, 3)}
        flags = ["--calib", str(data), "--samples", "8", "--seqlen", "128"]
        row["prune"] = measure(["prune", str(ckpt), "--layers", "2", *flags, "-o", str(work / "p")])
        row["wanda"] = measure(["sparsify", str(work / "p"), "--method", "wanda", "--sparsity", "0.5", *flags,
                                "-o", str(work / "w")])
        shutil.rmtree(work / "p")
        shutil.rmtree(work / "w")
        rec = work / "r.yaml"
        rec.write_text(yaml.safe_dump({"name": "prune-wanda", "model": str(ckpt), "output": str(work / "run"),
                                       "stages": [{"prune": {"layers": 2, "calib": calib}},
                                                  {"sparsify": {"method": "wanda", "sparsity": 0.5, "calib": calib}}]}))
        r = run_command(["run", str(rec)], lock=False)
        row["recipe"] = r
        commands = max(row["prune"]["peak_rss_mb"], row["wanda"]["peak_rss_mb"])
        row["recipe_over_commands"] = round(r["peak_rss_mb"] / commands, 3)
        shutil.rmtree(work / "run")
        shutil.rmtree(ckpt)
        rows.append(row)
        print(layers, json.dumps(row), flush=True)
    growth = {k: per_layer_growth(rows, k) for k in ("prune", "wanda", "recipe")}
    return {"shape": "Llama-3.2-1B width (hidden 2048, MLP 8192, 32/8 heads, vocab 128256, tied), random bf16",
            "calibration": "8 samples x 128 tokens", "rows": rows, "rss_growth_mb_per_layer": growth,
            "targets": {"recipe_growth_le_40mb": growth["recipe"] is not None and growth["recipe"] <= 40,
                        "recipe_within_10pct_of_commands": all(r["recipe_over_commands"] <= 1.10 for r in rows)}}


def table(results: dict) -> str:
    lines = []
    st = results.get("stages")
    if st:
        lines += ["| SmolLM2-135M shape, float32 | printed estimate GB | peak RSS GB | estimate / peak | wall s |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in st["rows"].items():
            est = f"{r['estimate_host_gb']:.2f}" if r.get("estimate_host_gb") else "none"
            ratio = f"{r['estimate_over_peak']:.2f}" if r.get("estimate_over_peak") else "-"
            lines.append(f"| {name} | {est} | {r['peak_rss_mb'] * 2**20 / 1e9:.2f} | {ratio} | {r['seconds']:.0f} |")
    rc = results.get("recipe")
    if rc:
        lines += ["", "| 1B-wide layers | prune command MB | Wanda command MB | `draftkit run` prune + Wanda MB | run / commands |",
                  "|---:|---:|---:|---:|---:|"]
        for r in rc["rows"]:
            lines.append(f"| {r['layers']} | {r['prune']['peak_rss_mb']:.0f} | {r['wanda']['peak_rss_mb']:.0f} | "
                         f"{r['recipe']['peak_rss_mb']:.0f} | {r['recipe_over_commands']:.2f} |")
        g = rc["rss_growth_mb_per_layer"]
        lines.append(f"| growth per layer | {g['prune']:+.1f} | {g['wanda']:+.1f} | {g['recipe']:+.1f} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["stages", "recipe"], action="append")
    ap.add_argument("--cases", default="", help="stages: only the rows whose name starts with one of these (comma-separated)")
    ap.add_argument("--depths", default="4,8")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(RESULTS.read_text())))
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
                          "torch": torch.__version__,
                          "note": "shared 2-core machine, run under the bench lock: peak RSS is the figure compared"}
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    work = Path(tempfile.mkdtemp(prefix="dk-estimates-"))
    try:
        tok, data = make_tokenizer_and_data(work)
        for part in args.only or ["recipe", "stages"]:
            if part == "stages":
                only = [c for c in args.cases.split(",") if c]
                prev = results.get("stages", {}).get("rows", {})
                results["stages"] = {"rows": stage_rows(work, tok, data, only, prev)}
                ratios = [r["estimate_over_peak"] for r in results["stages"]["rows"].values()]
                results["stages"]["target_within_25pct"] = all(x is not None and 0.75 <= x <= 1.25 for x in ratios)
            else:
                results["recipe"] = recipe_rows(work, tok, data, [int(d) for d in args.depths.split(",")])
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))


if __name__ == "__main__":
    main()
