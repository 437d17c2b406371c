"""Printed memory estimate against measured peak RSS, per stage and shape; ``draftkit run`` against the same
stages run as commands; the 8B-shaped prune as a one-stage recipe.

    flock /tmp/dk-bench.lock .venv/bin/python benchmarks/estimates.py --only stages       # one part at a time
    flock /tmp/dk-bench.lock .venv/bin/python benchmarks/estimates.py --only stages-1b --cases sparsify
    .venv/bin/python benchmarks/estimates.py --table                                       # README tables

Parts (every command is its own ``draftkit`` process; peak RSS is its VmHWM, see ``benchmarks/scale.py``):

1. ``stages`` / ``stages-1b``: every stage at its default settings (only the data named), on a random float32
   checkpoint with SmolLM2-135M's shape and on a random bf16 one with Llama-3.2-1B's width and 4 layers (distill:
   2 layers; merge: two checkpoints of the shape, written with different seeds). Cut where a default would take
   over half an hour on this 2-core machine: sparsify's default calibration (128 x 2048 tokens) to the
   ``--samples`` in the row, spec to 2 prompts and 1 timed pass. export reads a 50%-sparse copy (magnitude), spec
   drafts with a copy pruned by ``--drop`` (both made unmeasured), search to one candidate setting (SmolLM2
   shape: 6 blocks dropped and SFT on 32 rows, at the training defaults; 1B width: 2 dropped, no healing) measured
   on 2 prompts of 32 tokens. The estimate is the ``host`` figure the command prints (``memory_estimate_gb`` in its JSON report).
   Target: within 25% of the peak.
2. ``prune-growth``: ``prune --layers 2`` at its default calibration (64 x 1024 tokens) on 1B-wide checkpoints of
   ``--depths`` layers. Target: peak RSS grows by at most 40 MB per added layer.
3. ``recipe``: 1B-wide checkpoints of ``--depths`` layers: ``prune --layers 2`` then Wanda 50% (8 x 128 tokens), as
   two commands with ``--stream MODE`` and as one ``draftkit run`` with ``load.stream: MODE``, for each of
   ``--modes``. Targets: the recipe's peak grows by at most 40 MB per added layer and is within 10% of the larger
   command's.
4. ``8b``: the 16 GB Llama-3.1-8B-shaped checkpoint (``benchmarks/scale.py``), ``prune --layers 6`` (8 x 128
   tokens) as a one-stage recipe. Target: peak RSS within 3 GB.

Run each part under the bench lock (the commands above); it records the load average at each command and part.
Rows already in ``benchmarks/results/estimates.json`` stay unless measured again; ``--table`` prints the README's
tables from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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
    LLAMA_8B,
    SMOL_135M,
    make_tokenizer_and_data,
    per_layer_growth,
    write_random_checkpoint,
)
from benchmarks.scale import run as run_command  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "estimates.json"


def commit() -> str:
    """The commit measured (``+changes`` when draftkit/ differs from it)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "draftkit"], cwd=ROOT, capture_output=True, text=True).stdout
    return head + ("+changes" if dirty.strip() else "")


def measure(cmd: list[str]) -> dict:
    r = run_command(cmd, lock=False)  # the whole script runs under the bench lock
    r["commit"] = commit()
    est = r.get("estimate_gb") or {}
    host = est.get("host")
    line = r.get("stderr_estimate") or ""
    if host is None and "host " in line:  # distill prints its estimate; its report keeps it under "train"
        host = float(line.split("host ")[1].split()[0])
    peak_gb = r["peak_rss_mb"] * 2**20 / 1e9
    r["estimate_host_gb"] = host
    r["estimate_over_peak"] = round(host / peak_gb, 3) if host else None
    return r


SHAPES = {
    "smollm2-135m": "SmolLM2-135M shape (30 layers, hidden 576, MLP 1536, 9/3 heads, vocab 49152, tied), random float32",
    "llama-1b-width": "Llama-3.2-1B width (hidden 2048, MLP 8192, 32/8 heads, vocab 128256, tied), random bf16, "
                      "4 layers (distill: 2 layers, its fp32 AdamW state of a 4-layer model is over 8 GB)",
}


def stage_cases(shape: str, ckpt: Path, second: Path, work: Path, data: Path, text: Path, rows: Path) -> dict:
    """Each stage at its defaults, only the data named; spec with 2 prompts and 1 timed pass (its memory does not
    depend on either). export reads a 50%-sparse copy (magnitude), spec drafts with a copy pruned by ``--drop``:
    both made unmeasured by :func:`inputs`."""
    calib = ["--calib", str(data)]
    small = shape == "smollm2-135m"
    layers = "6" if small else "2"
    samples = "16" if shape == "smollm2-135m" else "4"  # 1B width: 4 x 2048 keeps SparseGPT to minutes here
    return {
        f"prune --layers {layers} (default calibration 64 x 1024)": ["prune", str(ckpt), "--layers", layers, *calib],
        f"sparsify wanda 50% ({samples} x 2048)": ["sparsify", str(ckpt), "--method", "wanda", "--sparsity", "0.5",
                                                   *calib, "--samples", samples],
        f"sparsify sparsegpt 50% ({samples} x 2048)": ["sparsify", str(ckpt), "--sparsity", "0.5", *calib,
                                                       "--samples", samples],
        "eval --ppl (defaults)": ["eval", str(ckpt), "--ppl", str(text)],
        "distill train (defaults, 32 rows)": ["distill", "train", str(second if shape != "smollm2-135m" else ckpt),
                                              "--dataset", str(rows)],
        "export (defaults: a 50%-sparse model, written sparse)": ["export", str(work / "sparse")],
        "spec (defaults, a pruned draft; 2 prompts, 1 pass)": ["spec", str(work / "pruned"), "--target", str(ckpt),
                                                               "--prompts", str(data), "--limit", "2", "--repeats", "1"],
        "merge slerp (defaults, two checkpoints)": ["merge", str(ckpt), str(work / "merge-b")],
        # the 1B width trains no candidate: its fp32 AdamW state beside the target is over the 10 GiB watchdog
        search_name(shape): ["search", str(ckpt), "--drop", layers, "--healing", "sft" if small else "none",
                             "--dataset", str(rows), "--prompts", str(data), "--prompt-limit", "2",
                             "--max-new-tokens", "32", "--speedup-engine", "none", "--calib", str(data)],
    }


def search_name(shape: str) -> str:
    if shape == "smollm2-135m":
        return "search (drop 6, SFT on 32 rows; 2 prompts of 32 tokens)"
    return "search (drop 2, no healing; 2 prompts of 32 tokens)"


def inputs(shape: str, ckpt: Path, work: Path, tok: Path, names: list[str]) -> None:
    """The inputs of the export, spec and merge rows, made without measuring."""
    if any(n.startswith("export") for n in names):
        run_command(["sparsify", str(ckpt), "--method", "magnitude", "--sparsity", "0.5", "-o", str(work / "sparse")],
                    lock=False)
    if any(n.startswith("spec") for n in names):
        drop = "10-15" if shape == "smollm2-135m" else "1-2"
        run_command(["prune", str(ckpt), "--drop", drop, "-o", str(work / "pruned")], lock=False)
    if any(n.startswith("merge") for n in names):
        if shape == "smollm2-135m":
            write_random_checkpoint(work / "merge-b", SMOL_135M, None, tok, dtype=torch.float32, seed=1)
        else:
            write_random_checkpoint(work / "merge-b", LLAMA_1B, 4, tok, seed=1)


def stage_rows(shape: str, work: Path, tok: Path, data: Path, only: list[str], previous: dict) -> dict:
    if shape == "smollm2-135m":
        ckpt, second = work / "smol135m", work / "smol135m"
        write_random_checkpoint(ckpt, SMOL_135M, None, tok, dtype=torch.float32)
    else:
        ckpt, second = work / "llama1b-4", work / "llama1b-2"
        write_random_checkpoint(ckpt, LLAMA_1B, 4, tok)
        write_random_checkpoint(second, LLAMA_1B, 2, tok, seed=1)
    text = work / "ppl.txt"
    rows = [json.loads(line) for line in data.read_text().splitlines()[:400]]
    text.write_text("\n\n".join(r["question"] + " " + r["answer"] for r in rows))
    distill_rows = work / "distill.jsonl"
    distill_rows.write_text("".join(json.dumps({"prompt": r["question"], "response": r["answer"]}) + "\n"
                                    for r in rows[:32]))
    cases = stage_cases(shape, ckpt, second, work, data, text, distill_rows)
    chosen = [n for n in cases if not only or any(n.startswith(o) for o in only)]
    inputs(shape, ckpt, work, tok, chosen)
    out = {k: v for k, v in previous.items() if k in cases}  # rows of cases no longer run are dropped
    for name in chosen:
        o = work / "o"
        out[name] = measure([*cases[name], "-o", str(o), "--overwrite"])
        shutil.rmtree(o, ignore_errors=True)
        print(shape, name, json.dumps(out[name]), flush=True)
    for p in (ckpt, second, work / "merge-b", work / "pruned", work / "sparse"):
        shutil.rmtree(p, ignore_errors=True)
    return out


def prune_growth_rows(work: Path, tok: Path, data: Path, depths: list[int]) -> dict:
    """``prune --layers 2`` at its default calibration (64 x 1024 tokens) on 1B-wide checkpoints of each depth."""
    rows = []
    for layers in depths:
        ckpt = work / f"llama1b-{layers}"
        size = write_random_checkpoint(ckpt, LLAMA_1B, layers, tok)
        r = measure(["prune", str(ckpt), "--layers", "2", "--calib", str(data), "-o", str(work / "p")])
        rows.append({"layers": layers, "checkpoint_gb": round(size / 1e9, 3), "prune": r})
        shutil.rmtree(work / "p", ignore_errors=True)
        shutil.rmtree(ckpt)
        print(layers, json.dumps(r), flush=True)
    growth = per_layer_growth(rows, "prune")
    return {"shape": SHAPES["llama-1b-width"].split(", 4 layers")[0], "calibration": "default (64 x 1024)",
            "rows": rows, "rss_growth_mb_per_layer": growth,
            "target_growth_le_40mb": growth is not None and growth <= 40}


def recipe_rows(work: Path, tok: Path, data: Path, depths: list[int], modes: list[str], previous: dict) -> dict:
    """prune + Wanda as two commands and as one recipe, each with ``--stream MODE`` / ``load.stream: MODE``."""
    calib = {"path": str(data), "samples": 8, "seqlen": 128}
    flags = ["--calib", str(data), "--samples", "8", "--seqlen", "128"]
    by_mode = {m: list(previous.get("modes", {}).get(m, {}).get("rows", [])) for m in ("on", "off")}
    for layers in depths:
        ckpt = work / f"llama1b-{layers}"
        size = write_random_checkpoint(ckpt, LLAMA_1B, layers, tok)
        for mode in modes:
            row: dict = {"layers": layers, "checkpoint_gb": round(size / 1e9, 3), "stream": mode}
            stream = ["--stream", mode]
            row["prune"] = measure(["prune", str(ckpt), "--layers", "2", *flags, *stream, "-o", str(work / "p")])
            row["wanda"] = measure(["sparsify", str(work / "p"), "--method", "wanda", "--sparsity", "0.5", *flags,
                                    *stream, "-o", str(work / "w")])
            shutil.rmtree(work / "p")
            shutil.rmtree(work / "w")
            rec = work / "r.yaml"
            rec.write_text(yaml.safe_dump({"name": "prune-wanda", "model": str(ckpt), "output": str(work / "run"),
                                           "load": {"stream": mode},
                                           "stages": [{"prune": {"layers": 2, "calib": calib}},
                                                      {"sparsify": {"method": "wanda", "sparsity": 0.5,
                                                                    "calib": calib}}]}))
            r = run_command(["run", str(rec)], lock=False)
            r["commit"] = commit()
            row["recipe"] = r
            commands = max(row["prune"]["peak_rss_mb"], row["wanda"]["peak_rss_mb"])
            row["recipe_over_commands"] = round(r["peak_rss_mb"] / commands, 3)
            shutil.rmtree(work / "run")
            rows = [x for x in by_mode[mode] if x["layers"] != layers] + [row]
            by_mode[mode] = sorted(rows, key=lambda x: x["layers"])
            print(layers, mode, json.dumps(row), flush=True)
        shutil.rmtree(ckpt)
    out: dict = {"shape": SHAPES["llama-1b-width"].split(", 4 layers")[0], "calibration": "8 samples x 128 tokens",
                 "modes": {}}
    for mode, rows in by_mode.items():
        if not rows:
            continue
        growth = {k: per_layer_growth(rows, k) for k in ("prune", "wanda", "recipe")}
        same = all([bool(v) for v in (r["recipe"].get("stage_streamed") or {}).values()] == [r["prune"]["streamed"], r["wanda"]["streamed"]]
                   for r in rows)
        out["modes"][mode] = {
            "rows": rows, "rss_growth_mb_per_layer": growth,
            "targets": {
                # stream off keeps every layer resident by request: growth with depth is the point, not a target
                "recipe_growth_le_40mb": (growth["recipe"] is not None and growth["recipe"] <= 40) if mode != "off"
                else None,
                "recipe_within_10pct_of_commands": all(r["recipe_over_commands"] <= 1.10 for r in rows),
                "recipe_stages_streamed_as_their_commands": same}}
    return out


def eight_b_recipe(work: Path, tok: Path, data: Path) -> dict:
    """``prune --layers 6`` (8 x 128 tokens) on the 16 GB Llama-3.1-8B-shaped checkpoint, as a one-stage recipe."""
    ckpt = work / "llama8b"
    t0 = time.perf_counter()
    size = write_random_checkpoint(ckpt, LLAMA_8B, 32, tok)
    wrote = round(time.perf_counter() - t0, 1)
    rec = work / "r8.yaml"
    rec.write_text(yaml.safe_dump({"name": "prune6", "model": str(ckpt), "output": str(work / "run8"),
                                   "stages": [{"prune": {"layers": 6, "calib": {"path": str(data), "samples": 8,
                                                                                 "seqlen": 128}}}]}))
    try:
        r = run_command(["run", str(rec)], lock=False)
        r["commit"] = commit()
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(work / "run8", ignore_errors=True)
    return {"shape": "Llama-3.1-8B (32 layers, hidden 4096, MLP 14336, 32/8 heads, vocab 128256, untied), random bf16",
            "checkpoint_gb": round(size / 1e9, 3), "write_seconds": wrote, "calibration": "8 samples x 128 tokens",
            "recipe": r, "target_le_3gb": r["peak_rss_mb"] <= 3 * 1024}


def _ratio_ok(x) -> bool:
    return x is not None and 0.75 <= x <= 1.25


def _commit(r: dict) -> str:
    return r.get("commit") or "not recorded"


def table(results: dict) -> str:
    lines = []
    for shape, st in (results.get("stages") or {}).items():
        if not isinstance(st, dict) or "rows" not in st:
            continue
        lines += ["", f"| {SHAPES[shape].split(' (')[0]} | printed estimate GB | peak RSS GB | estimate / peak | wall s | "
                      "commit |", "|---|---:|---:|---:|---:|---|"]
        for name, r in st["rows"].items():
            est = f"{r['estimate_host_gb']:.2f}" if r.get("estimate_host_gb") else "none"
            ratio = f"{r['estimate_over_peak']:.2f}" if r.get("estimate_over_peak") else "-"
            lines.append(f"| {name} | {est} | {r['peak_rss_mb'] * 2**20 / 1e9:.2f} | {ratio} | {r['seconds']:.0f} | "
                         f"{_commit(r)} |")
    pg = results.get("prune_growth")
    if pg:
        lines += ["", "| 1B-wide layers | prune --layers 2, default calibration: peak RSS MB | estimate / peak | commit |",
                  "|---:|---:|---:|---|"]
        for r in pg["rows"]:
            lines.append(f"| {r['layers']} | {r['prune']['peak_rss_mb']:.0f} | {r['prune']['estimate_over_peak']:.2f} | "
                         f"{_commit(r['prune'])} |")
        lines.append(f"| growth per layer | {pg['rss_growth_mb_per_layer']:+.1f} | | |")
    rc = results.get("recipe")
    if rc and "modes" in rc:
        lines += ["", "| 1B-wide layers, stream | prune command MB | Wanda command MB | `draftkit run` prune + Wanda MB | "
                      "run / commands | commit |", "|---|---:|---:|---:|---:|---|"]
        for mode, m in rc["modes"].items():
            for r in m["rows"]:
                lines.append(f"| {r['layers']}, {mode} | {r['prune']['peak_rss_mb']:.0f} | {r['wanda']['peak_rss_mb']:.0f} | "
                             f"{r['recipe']['peak_rss_mb']:.0f} | {r['recipe_over_commands']:.2f} | {_commit(r['recipe'])} |")
            g = m["rss_growth_mb_per_layer"]
            lines.append(f"| growth per layer, {mode} | {g['prune']:+.1f} | {g['wanda']:+.1f} | {g['recipe']:+.1f} | | |")
    e = results.get("eight_b_recipe")
    if e:
        r = e["recipe"]
        lines += ["", "| Llama-3.1-8B shape, one-stage recipe | checkpoint GB | wall s | peak RSS MB | target | commit |",
                  "|---|---:|---:|---:|---|---|",
                  f"| prune --layers 6 (32 layers) | {e['checkpoint_gb']:.1f} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
                  f"<= 3072 MB: {'met' if e['target_le_3gb'] else 'missed'} | {_commit(r)} |"]
    return "\n".join(lines).strip("\n")


def _met(ok) -> str:
    return "not a target" if ok is None else ("met" if ok else "missed")


def summary(results: dict) -> str:
    """The README's sentences on the targets, from the JSON (one line each)."""
    lines = []
    for shape, st in (results.get("stages") or {}).items():
        rows = st.get("rows") or {}
        ratios = {n: r.get("estimate_over_peak") for n, r in rows.items()}
        out = [f"{n.split(' (')[0]} {x:.3f}" if x else f"{n.split(' (')[0]} (no estimate)"
               for n, x in ratios.items() if not _ratio_ok(x)]
        have = [x for x in ratios.values() if x]
        lines.append(f"{SHAPES[shape].split(' (')[0]}: {len(rows) - len(out)} of {len(rows)} rows within 25% "
                     f"(estimate / peak {min(have):.2f} to {max(have):.2f})" + (f"; outside: {', '.join(out)}." if out else "."))
    smol = (results.get("stages") or {}).get("smollm2-135m", {}).get("rows", {})
    prune = next((r for n, r in smol.items() if n.startswith("prune")), None)
    if prune:
        gb_ = prune["peak_rss_mb"] * 2**20 / 1e9
        lines.append(f"Prune at its default calibration on the SmolLM2-135M shape: peak {gb_:.2f} GB "
                     f"(target at most 2.5 GB: {_met(gb_ <= 2.5)}).")
    pg = results.get("prune_growth")
    if pg:
        depths = " and ".join(str(r["layers"]) for r in pg["rows"])
        lines.append(f"Prune at its default calibration on 1B-wide checkpoints of {depths} layers: "
                     f"{pg['rss_growth_mb_per_layer']:+.1f} MB per added layer (target at most 40 MB: "
                     f"{_met(pg['target_growth_le_40mb'])}).")
    for mode, m in ((results.get("recipe") or {}).get("modes") or {}).items():
        ratios = [r["recipe_over_commands"] for r in m["rows"]]
        g, t = m["rss_growth_mb_per_layer"], m["targets"]
        same = t.get("recipe_stages_streamed_as_their_commands")
        lines.append(f"Recipe with `load.stream: {mode}`: {min(ratios):.2f} to {max(ratios):.2f} times the larger command "
                     f"(target at most 1.10: {_met(t['recipe_within_10pct_of_commands'])}), {g['recipe']:+.1f} MB per added "
                     f"layer (commands: prune {g['prune']:+.1f}, Wanda {g['wanda']:+.1f}; target at most 40 MB: "
                     f"{_met(t['recipe_growth_le_40mb'])})"
                     + ("" if same is None else f"; each stage streamed as its command did: {'yes' if same else 'no'}") + ".")
    e = results.get("eight_b_recipe")
    if e:
        streamed = (e["recipe"].get("stage_streamed") or {}).get("prune")
        lines.append(f"The 8B-shaped `prune --layers 6` as a one-stage recipe: peak {e['recipe']['peak_rss_mb']:.0f} MB "
                     f"(target at most 3072 MB: {_met(e['target_le_3gb'])})"
                     + ("" if streamed is None else f", {'streamed' if streamed else 'resident'}") + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["stages", "stages-1b", "prune-growth", "recipe", "8b"], action="append")
    ap.add_argument("--cases", default="", help="stages: only the rows whose name starts with one of these (comma-separated)")
    ap.add_argument("--depths", default="4,8")
    ap.add_argument("--modes", default="on,off", help="recipe: the load.stream settings measured")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        results = json.loads(RESULTS.read_text())
        print(table(results) + "\n\n" + summary(results))
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    stages = results.setdefault("stages", {})
    if "rows" in stages:  # the layout before the 1B-wide rows: SmolLM2's rows only
        results["stages"] = stages = {"smollm2-135m": {"rows": stages["rows"]}}
    results.pop("machine", None)
    loads = results.setdefault("loadavg_at_start", {})
    work = Path(tempfile.mkdtemp(prefix="dk-estimates-"))
    try:
        tok, data = make_tokenizer_and_data(work)
        for part in args.only or ["stages", "stages-1b", "prune-growth", "recipe", "8b"]:
            loads[part] = [round(x, 2) for x in os.getloadavg()]
            results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            results["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__,
                                  "note": "shared 2-core machine, run under the bench lock: peak RSS is the figure "
                                          "compared; each command's load average is in its row"}
            if part in ("stages", "stages-1b"):
                shape = "smollm2-135m" if part == "stages" else "llama-1b-width"
                only = [c for c in args.cases.split(",") if c]
                prev = stages.get(shape, {}).get("rows", {})
                rows = stage_rows(shape, work, tok, data, only, prev)
                ratios = [r["estimate_over_peak"] for r in rows.values()]
                stages[shape] = {"shape": SHAPES[shape], "rows": rows,
                                 "target_within_25pct": all(_ratio_ok(x) for x in ratios)}
            elif part == "prune-growth":
                results["prune_growth"] = prune_growth_rows(work, tok, data, [int(d) for d in args.depths.split(",")])
                four = next((r["prune"] for r in results["prune_growth"]["rows"] if r["layers"] == 4), None)
                if four is not None:  # the 1B-wide stage table's prune row is this 4-layer run (the same command)
                    wide = stages.setdefault("llama-1b-width", {"shape": SHAPES["llama-1b-width"], "rows": {}})
                    wide["rows"]["prune --layers 2 (default calibration 64 x 1024)"] = four
                    wide["target_within_25pct"] = all(_ratio_ok(r["estimate_over_peak"]) for r in wide["rows"].values())
            elif part == "recipe":
                prev = results.get("recipe", {}) if "modes" in results.get("recipe", {}) else {}
                results["recipe"] = recipe_rows(work, tok, data, [int(d) for d in args.depths.split(",")],
                                                args.modes.split(","), prev)
            else:
                results["eight_b_recipe"] = eight_b_recipe(work, tok, data)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results) + "\n\n" + summary(results))


if __name__ == "__main__":
    main()
