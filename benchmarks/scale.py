"""Peak memory and wall time of prune and sparsify as checkpoints get deeper and wider.

    python benchmarks/scale.py                 # 1B-wide depth sweep, the 8B-shaped runs, small-model speed
    python benchmarks/scale.py --skip-8b       # without the 16 GB checkpoint
    python benchmarks/scale.py --only small    # just the small-model speed check

Parts (each command runs as its own ``draftkit`` process; peak RSS is that process's VmHWM):

1. ``depth``: random bf16 checkpoints with Llama-3.2-1B's width (hidden 2048, MLP 8192, 32/8 heads,
   vocab 128256, tied embeddings) and 4, 8, 16 layers: ``prune --layers 2``, SparseGPT 50%, Wanda 50%,
   8 samples x 128 tokens. Target: RSS grows by <= 40 MB per added layer for prune and Wanda; SparseGPT
   on 4 layers <= 2.2 GB. SparseGPT runs on the 4-layer checkpoint (``--sgpt-depths 4,8,16`` for all:
   each takes 10-20 minutes on this machine).
2. ``8b``: a random checkpoint with Llama-3.1-8B's exact shape (32 layers, hidden 4096, MLP 14336,
   8 KV heads, vocab 128256, untied head; 16 GB bf16), ``prune --layers 6`` (8 x 128 tokens), target
   <= 3 GB; and a 4-layer checkpoint of that width sparsified with SparseGPT 50%, target <= 4 GB. Both
   are deleted afterwards.
3. ``small``: the README's demo commands and a SmolLM2-135M-shaped float32 model (resident), timed
   against a reference revision (``--ref``, default the commit before layer streaming) checked out in a
   temporary git worktree: medians of ``--repeats`` alternating runs.

Every checkpoint is written shard by shard by :class:`draftkit.checkpoint.stream.ShardWriter`, one
random tensor at a time (never the whole model in memory). Timed runs take the shared bench lock
(``fcntl.flock`` on ``/tmp/dk-bench.lock``, the lock ``flock /tmp/dk-bench.lock CMD`` takes) one command at a
time; ``flock /tmp/dk-bench.lock python benchmarks/scale.py --lock-held ...`` holds it for the whole script
instead. Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
LOCK = Path("/tmp/dk-bench.lock")
LOCK_HELD = False  # --lock-held: the whole script runs under `flock /tmp/dk-bench.lock`
REF = "52ea14b"  # main before the streaming work (#9)

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=4096)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=4096)
SMOL_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                 vocab_size=49152, tie_word_embeddings=True, num_hidden_layers=30, max_position_embeddings=2048)


def write_random_checkpoint(out: Path, shape: dict, layers: int | None, tokenizer_dir: Path, *,
                            dtype=torch.bfloat16, seed: int = 0) -> int:
    """A random Llama checkpoint written tensor by tensor; returns its size in bytes."""
    from transformers import LlamaConfig

    from draftkit.checkpoint import empty_model

    kw = dict(shape)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    config = LlamaConfig(**kw, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    skeleton = empty_model(config)
    plan = [(k, tuple(v.shape), dtype) for k, v in skeleton.state_dict().items()
            if not (config.tie_word_embeddings and k == "lm_head.weight")]
    return write_plan(out, config, plan, tokenizer_dir, seed=seed)


def write_plan(out: Path, config, plan: list[tuple[str, tuple, torch.dtype]], tokenizer_dir: Path, *,
               seed: int = 0) -> int:
    """Random tensors named by ``plan`` written one at a time (norms 1), the config and the tokenizer; returns the
    checkpoint's size in bytes."""
    from draftkit.checkpoint.stream import ShardWriter

    writer = ShardWriter(out, plan, max_shard_bytes=2 * 2**30)
    g = torch.Generator().manual_seed(seed)
    for name, shp, dt in plan:
        t = torch.ones(shp, dtype=dt) if name.endswith("norm.weight") else torch.randn(shp, generator=g, dtype=dt) * 0.02
        writer.write({name: t})
        del t
    writer.close()
    config.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return writer.total_size


def make_tokenizer_and_data(work: Path) -> tuple[Path, Path]:
    before = os.environ.get("DRAFTKIT_THREADS")
    from tests.conftest import build_tokenizer, make_rows

    # tests/conftest.py pins DRAFTKIT_THREADS=1 for the test suite; the measured commands must not inherit it
    # (an earlier run of this script timed the new tree with 1 thread against the reference's 2)
    if before is None:
        os.environ.pop("DRAFTKIT_THREADS", None)
    else:
        os.environ["DRAFTKIT_THREADS"] = before

    tok = work / "tokenizer"
    build_tokenizer(tok)
    data = work / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(3000, seed=1)))
    return tok, data


# The command runs in a fresh interpreter that writes its own VmHWM (peak RSS of its address space since
# exec) at exit. ``ru_maxrss`` from wait4 is not used: Linux carries the parent's RSS at fork into the
# child's maxrss, so a child of this (checkpoint-writing) process would report at least the parent's size.
_LAUNCH = (
    "import atexit, os, runpy, sys\n"
    "def _peak():\n"
    "    with open('/proc/self/status') as f:\n"
    "        hwm = next(l for l in f if l.startswith('VmHWM'))\n"
    "    open(os.environ['DK_PEAK_FILE'], 'w').write(hwm.split()[1])\n"
    "atexit.register(_peak)\n"
    "sys.argv = ['draftkit', *sys.argv[1:]]\n"
    "runpy.run_module('draftkit', run_name='__main__')\n"
)


@contextlib.contextmanager
def bench_lock() -> Iterator[None]:
    """The shared bench lock: ``fcntl.flock`` on :data:`LOCK`, the same lock as ``flock /tmp/dk-bench.lock CMD``
    (so a command run under ``flock`` and this script never measure at once). Under ``--lock-held`` (the whole
    script run by ``flock /tmp/dk-bench.lock``) it is not taken again: ``flock`` on a second open of the file
    would wait for the lock its own parent holds."""
    if LOCK_HELD:
        yield
        return
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run(cmd: list[str], *, env_path: Path = ROOT, lock: bool = True) -> dict:
    """One ``draftkit`` command: wall seconds, peak RSS (MB, the process's VmHWM) and its JSON report."""
    peak_file = Path(tempfile.mkstemp(prefix="dk-peak-")[1])
    env = {**os.environ, "PYTHONPATH": str(env_path), "DRAFTKIT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "DK_PEAK_FILE": str(peak_file)}
    held = bench_lock() if lock else contextlib.nullcontext()
    with held:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, *cmd, "--json"], stdout=out, stderr=err,
                                    env=env, cwd=env_path)
            _, status, _ = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(), err.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}): {stderr[-2000:]}")
    report = json.loads(stdout)
    peak_kb = int(peak_file.read_text())
    peak_file.unlink()
    return {"seconds": round(wall, 2), "peak_rss_mb": round(peak_kb / 1024, 1), "loadavg_start": round(load, 2),
            "streamed": bool(report.get("streamed")), "report_seconds": report.get("seconds"),
            "threads": report.get("threads"),
            "estimate_gb": report.get("memory_estimate_gb"),
            "stderr_estimate": next((l for l in stderr.splitlines() if "memory estimate" in l), None),
            **(_recipe_stages(report["stages"]) if isinstance(report.get("stages"), list) else {})}


def _recipe_stages(stages: list[dict]) -> dict:
    """A ``draftkit run`` report's stages: each one's seconds, whether it streamed, its printed host estimate (GB)."""
    names = [str(st.get("stage") or st.get("name") or i) for i, st in enumerate(stages)]
    reports = [st.get("report") or {} for st in stages]
    return {"stage_seconds": {n: st.get("seconds") for n, st in zip(names, stages, strict=True)},
            "stage_streamed": {n: r.get("streamed") for n, r in zip(names, reports, strict=True)},
            "stage_estimate_host_gb": {n: (r.get("memory_estimate_gb") or {}).get("host")
                                       for n, r in zip(names, reports, strict=True)}}


def per_layer_growth(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of peak RSS (MB) against layer count."""
    xs = [r["layers"] for r in rows]
    ys = [r[key]["peak_rss_mb"] for r in rows]
    if len(xs) < 2:
        return None
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs), 1)


def depth_sweep(work: Path, tok: Path, data: Path, depths: list[int], sgpt_depths: list[int], save,
                rows: list[dict] | None = None, methods: tuple[str, ...] = ("prune", "wanda", "sparsegpt")) -> dict:
    """Measurements already in ``rows`` (from an earlier run) are kept and not repeated."""
    by_depth = {r["layers"]: r for r in rows or []}
    calib = ["--calib", str(data), "--samples", "8", "--seqlen", "128", "-q"]
    commands = {
        "prune": ["prune", "--layers", "2"],
        "wanda": ["sparsify", "--method", "wanda", "--sparsity", "0.5"],
        "sparsegpt": ["sparsify", "--sparsity", "0.5"],
    }
    for layers in depths:
        todo = [m for m in methods if m not in by_depth.get(layers, {}) and (m != "sparsegpt" or layers in sgpt_depths)]
        if not todo:
            continue
        ckpt = work / f"llama1b-{layers}"
        size = write_random_checkpoint(ckpt, LLAMA_1B, layers, tok)
        row = by_depth.setdefault(layers, {"layers": layers, "checkpoint_gb": round(size / 1e9, 3)})
        for m in todo:
            cmd, *rest = commands[m]
            row[m] = run([cmd, str(ckpt), *rest, *calib, "-o", str(work / f"o-{m}")])
            shutil.rmtree(work / f"o-{m}", ignore_errors=True)
            print(layers, m, json.dumps(row[m]), flush=True)
            save({"rows": sorted(by_depth.values(), key=lambda r: r["layers"]), "partial": True})
        shutil.rmtree(ckpt)
    rows = list(by_depth.values())
    rows.sort(key=lambda r: r["layers"])
    growth = {k: per_layer_growth([r for r in rows if k in r], k) for k in ("prune", "sparsegpt", "wanda")}
    four = next((r for r in rows if r["layers"] == 4), None)
    return {
        "shape": "Llama-3.2-1B width (hidden 2048, MLP 8192, 32/8 heads, vocab 128256, tied), random bf16",
        "calibration": "8 samples x 128 tokens",
        "sparsegpt_depths": sorted({r["layers"] for r in rows if "sparsegpt" in r}),
        "rows": rows,
        "rss_growth_mb_per_layer": growth,
        "targets": {
            "prune_growth_le_40mb": growth["prune"] is not None and growth["prune"] <= 40,
            "wanda_growth_le_40mb": growth["wanda"] is not None and growth["wanda"] <= 40,
            "sparsegpt_4_layers_le_2.2gb": None if four is None or "sparsegpt" not in four
            else four["sparsegpt"]["peak_rss_mb"] <= 2.2 * 1024,
        },
    }


def eight_b(work: Path, tok: Path, data: Path, parts: list[str], out: dict) -> dict:
    """``8b``: prune --layers 6 on the 32-layer checkpoint; ``8b-sparsegpt``: SparseGPT on a 4-layer one."""
    calib = ["--calib", str(data), "--samples", "8", "--seqlen", "128", "-q"]
    out.update(shape="Llama-3.1-8B (32 layers, hidden 4096, MLP 14336, 32/8 heads, vocab 128256, untied), random bf16",
               calibration="8 samples x 128 tokens")
    targets = out.setdefault("targets", {})
    if "8b" in parts:
        ckpt = work / "llama8b"
        t0 = time.perf_counter()
        out["checkpoint_gb"] = round(write_random_checkpoint(ckpt, LLAMA_8B, 32, tok) / 1e9, 3)
        out["write_seconds"] = round(time.perf_counter() - t0, 1)
        try:
            out["prune_layers_6"] = run(["prune", str(ckpt), "--layers", "6", *calib, "-o", str(work / "o8")])
            out["prune_output_gb"] = round(sum(f.stat().st_size for f in (work / "o8").glob("*.safetensors")) / 1e9, 3)
        finally:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(work / "o8", ignore_errors=True)
        targets["prune_le_3gb"] = out["prune_layers_6"]["peak_rss_mb"] <= 3 * 1024
    if "8b-sparsegpt" in parts:
        ckpt4 = work / "llama8b-4"
        out["checkpoint_4_layers_gb"] = round(write_random_checkpoint(ckpt4, LLAMA_8B, 4, tok) / 1e9, 3)
        try:
            out["sparsegpt_4_layers"] = run(["sparsify", str(ckpt4), "--sparsity", "0.5", *calib, "-o", str(work / "o8s")])
        finally:
            shutil.rmtree(ckpt4, ignore_errors=True)
            shutil.rmtree(work / "o8s", ignore_errors=True)
        targets["sparsegpt_4_layers_le_4gb"] = out["sparsegpt_4_layers"]["peak_rss_mb"] <= 4 * 1024
    return out


def small(work: Path, tok: Path, data: Path, ref: str, repeats: int, only: str = "", previous: dict | None = None,
          save=None) -> dict:
    """The README's demo commands and a SmolLM2-135M-shaped model, this tree against ``ref``."""
    old = work / "ref-tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), ref], check=True,
                   capture_output=True)
    try:
        smol = work / "smol135m"
        write_random_checkpoint(smol, SMOL_135M, None, tok, dtype=torch.float32)
        teacher = ROOT / "examples" / "tiny" / "teacher"
        if not teacher.is_dir():
            teacher = ROOT / "draftkit" / "_shipped" / "examples" / "tiny" / "teacher"
        demo_data = teacher.parent / "data" / "train.jsonl"
        demo = ["--calib", str(demo_data), "--samples", "64", "--seqlen", "256", "-q"]
        smol_calib = ["--calib", str(data), "--samples", "32", "--seqlen", "256", "-q"]
        cases = {
            "demo prune --layers 2": ["prune", str(teacher), "--layers", "2", *demo],
            "demo sparsify 50%": ["sparsify", str(teacher), "--sparsity", "0.5", *demo],
            "demo sparsify 2:4": ["sparsify", str(teacher), "--pattern", "2:4", *demo],
            "smollm2-135m-shape prune --layers 6": ["prune", str(smol), "--layers", "6", *smol_calib],
            "smollm2-135m-shape sparsify 50%": ["sparsify", str(smol), "--sparsity", "0.5", *smol_calib],
        }
        rows = dict(previous or {})
        for name, cmd in cases.items():
            if only and not name.startswith(only):
                continue
            times: dict[str, list[float]] = {"new": [], "ref": []}
            rss: dict[str, list[float]] = {"new": [], "ref": []}
            threads: list = []
            for _ in range(repeats):
                for which, tree in (("ref", old), ("new", ROOT)):
                    o = work / f"o-{which}"
                    r = run([*cmd, "-o", str(o), "--overwrite"], env_path=tree)
                    times[which].append(r["seconds"])
                    if which == "new":
                        threads.append(r["threads"])  # the new tree picks its thread count (--threads auto)
                    rss[which].append(r["peak_rss_mb"])
                    shutil.rmtree(o, ignore_errors=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows[name] = {"loadavg": round(os.getloadavg()[0], 2), "seconds": times, "median_seconds": med, "peak_rss_mb": rss,
                          "new_threads": threads, "new_over_ref": round(med["new"] / med["ref"], 3)}
            print(name, json.dumps(rows[name]), flush=True)
            if save is not None:
                save({"ref": ref, "repeats": repeats, "cases": rows, "partial": True})
        return {"ref": ref, "repeats": repeats, "cases": rows,
                "target_le_1.10": all(r["new_over_ref"] <= 1.10 for r in rows.values())}  # over the cases run
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)


def table(results: dict) -> str:
    """The README's tables, from the results JSON."""
    lines = []
    d = results.get("depth")
    if d:
        lines += ["| layers | checkpoint GB | prune --layers 2: s / peak RSS MB | SparseGPT 50%: s / MB | Wanda 50%: s / MB |",
                  "|---:|---:|---:|---:|---:|"]
        for r in d["rows"]:
            cells = [f"{r[k]['seconds']:.0f} / {r[k]['peak_rss_mb']:.0f}" if k in r else "not run"
                     for k in ("prune", "sparsegpt", "wanda")]
            lines.append(f"| {r['layers']} | {r['checkpoint_gb']:.2f} | " + " | ".join(cells) + " |")
        g = d["rss_growth_mb_per_layer"]
        cells = [f"{g[k]:+.1f} MB" if g[k] is not None else "-" for k in ("prune", "sparsegpt", "wanda")]
        lines.append("| RSS growth per layer | | " + " | ".join(cells) + " |")
    e = results.get("llama_3_1_8b_shape")
    if e:
        lines += ["", "| Llama-3.1-8B shape | checkpoint GB | wall s | peak RSS MB | target |", "|---|---:|---:|---:|---|"]
        for key, size, label, target, limit in (
            ("prune_layers_6", "checkpoint_gb", "prune --layers 6 (32 layers)", "prune_le_3gb", 3072),
            ("sparsegpt_4_layers", "checkpoint_4_layers_gb", "SparseGPT 50% (4 layers)", "sparsegpt_4_layers_le_4gb", 4096),
        ):
            if key in e:
                met = "met" if e["targets"][target] else "missed"
                lines.append(f"| {label} | {e[size]:.1f} | {e[key]['seconds']:.0f} | {e[key]['peak_rss_mb']:.0f} | "
                             f"<= {limit} MB: {met} |")
    sm = results.get("small_models_vs_ref")
    if sm:
        lines += ["", f"| small model (resident) | {sm['ref']} median s | now median s | now / before |", "|---|---:|---:|---:|"]
        for name, r in sm["cases"].items():
            lines.append(f"| {name} | {r['median_seconds']['ref']:.1f} | {r['median_seconds']['new']:.1f} | {r['new_over_ref']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["depth", "8b", "8b-sparsegpt", "small"], action="append")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--depths", default="4,8,16")
    ap.add_argument("--sgpt-depths", default="4", help="depths that also run SparseGPT (each ~10-20 min here)")
    ap.add_argument("--resume", action="store_true", help="keep the depth measurements already in the results JSON")
    ap.add_argument("--methods", default="prune,wanda,sparsegpt", help="depth sweep: which commands")
    ap.add_argument("--ref", default=REF)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small-cases", default="", help="small: only the cases whose name starts with this (e.g. demo)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--table", action="store_true", help="print the README tables from the saved JSON and exit")
    ap.add_argument("--lock-held", action="store_true",
                    help="the script runs under `flock /tmp/dk-bench.lock`: do not take the lock per command")
    args = ap.parse_args()
    global LOCK_HELD
    LOCK_HELD = args.lock_held
    if args.table:
        print(table(json.loads(RESULTS.read_text())))
        return
    parts = args.only or ["depth", "8b", "small", "8b-sparsegpt"]
    if args.skip_8b:
        parts = [p for p in parts if not p.startswith("8b")]
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
                          "torch": torch.__version__, "note": "shared 2-core machine: wall times are indicative, "
                          "peak RSS figures are the targets"}
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dk-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tok, data = make_tokenizer_and_data(work)
        if "depth" in parts:
            depths = [int(x) for x in args.depths.split(",")]
            sgpt = [int(x) for x in args.sgpt_depths.split(",") if x]
            done = results.get("depth", {}).get("rows", []) if args.resume else []

            def save(partial: dict) -> None:
                results["depth"] = partial
                RESULTS.write_text(json.dumps(results, indent=2) + "\n")

            results["depth"] = depth_sweep(work, tok, data, depths, sgpt, save, done, tuple(args.methods.split(",")))
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        if "8b" in parts:
            results["llama_3_1_8b_shape"] = eight_b(work, tok, data, ["8b"], results.get("llama_3_1_8b_shape", {}))
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        if "small" in parts:
            def save_small(partial: dict) -> None:
                results["small_models_vs_ref"] = partial
                RESULTS.write_text(json.dumps(results, indent=2) + "\n")

            prev = results.get("small_models_vs_ref", {}).get("cases") if args.resume else None
            results["small_models_vs_ref"] = small(work, tok, data, args.ref, args.repeats, args.small_cases, prev,
                                                   save_small)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        if "8b-sparsegpt" in parts:
            results["llama_3_1_8b_shape"] = eight_b(work, tok, data, ["8b-sparsegpt"], results.get("llama_3_1_8b_shape", {}))
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
