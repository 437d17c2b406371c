"""The demo recipe (``draftkit run demo``, what ``./bootstrap.sh demo`` runs): this tree against a reference
commit, wall time and peak RSS, alternated runs.

    .venv/bin/python benchmarks/demo_speed.py --label first --rounds 3 --threads 2   # takes the bench lock per pair
    .venv/bin/python benchmarks/demo_speed.py --table

Each round is one pair of runs, the reference then this tree, each a fresh ``draftkit run demo --json`` process
(peak RSS = its VmHWM, :func:`benchmarks.scale.run`) with its own empty output folder and cache folder
(``DRAFTKIT_CACHE_DIR``; ``DRAFTKIT_CACHE`` unset), so no run reuses another's work. The reference is checked out
in a temporary detached git worktree and runs from it with this venv (``PYTHONPATH`` = that worktree: its own
``draftkit``, recipe and demo teacher). The shared bench lock (``/tmp/dk-bench.lock``, ``fcntl.flock``) is held
for each pair and released between pairs (``--hold``: for all of them). ``--threads N`` pins both trees to N torch
threads (``DRAFTKIT_THREADS``): under ``auto`` each run picks its count from the cores busy when it starts, and on a
shared machine that count, not the code, decided the pairs (1.22x, 2.20x, 1.09x). Writes ``benchmarks/results/demo_speed.json`` under ``--label`` (the
median of each tree's runs, their ratio, the load average before each run and at the start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.scale import bench_lock, run  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "demo_speed.json"
REF = "0843483"  # main at the start of the session that reworked the recipe runner (issue #18)


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def imported_from(tree: Path) -> str:
    """Where ``draftkit`` is imported from when run as :func:`run` runs it (to be sure each tree runs its own)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", "import draftkit; print(draftkit.__file__)"], cwd=tree, env=env,
                          check=True, capture_output=True, text=True).stdout.strip()


def one_run(tree: Path, work: Path, tag: str, threads: int | None = None) -> dict:
    out, cache = work / f"out-{tag}", work / f"cache-{tag}"
    os.environ["DRAFTKIT_CACHE_DIR"] = str(cache)
    os.environ.pop("DRAFTKIT_CACHE", None)
    if threads is not None:
        os.environ["DRAFTKIT_THREADS"] = str(threads)
    else:
        os.environ.pop("DRAFTKIT_THREADS", None)
    try:
        r = run(["run", "demo", "--set", f"output={out}"], env_path=tree, lock=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"], "loadavg_start": r["loadavg_start"],
            "threads": r.get("threads"), "commit": _git("rev-parse", "--short", "HEAD", cwd=tree),
            "stage_seconds": r.get("stage_seconds")}


def summarize(m: dict) -> None:
    med = {k: statistics.median(r["seconds"] for r in m["runs"] if r["tree"] == k) for k in ("ref", "new")}
    m["median_seconds"] = med
    m["new_over_ref"] = round(med["new"] / med["ref"], 3)
    m["target_no_slower_than_1.05"] = m["new_over_ref"] <= 1.05


def table(results: dict) -> str:
    lines = [f"| demo recipe, {results['ref']} against | threads | runs each | {results['ref']} median s | now median s | "
             "now / before | each pair | load average at the runs' start (median) |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for label, m in results["measurements"].items():
        n = sum(r["tree"] == "new" for r in m["runs"])
        commits = sorted({r["commit"] for r in m["runs"] if r["tree"] == "new" and r.get("commit")}) or [m["new_commit"]]
        load = statistics.median(r["loadavg_start"] for r in m["runs"])
        by_round = {}
        for r in m["runs"]:
            by_round.setdefault(r["round"], {})[r["tree"]] = r["seconds"]
        pairs = ", ".join(f"{p['new'] / p['ref']:.2f}" for _, p in sorted(by_round.items()) if len(p) == 2)
        lines.append(f"| {label} ({', '.join(commits)}) | {m.get('threads', 'auto')} | {n} | {m['median_seconds']['ref']:.1f} | "
                     f"{m['median_seconds']['new']:.1f} | {m['new_over_ref']:.2f} | {pairs} | {load:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default=REF)
    ap.add_argument("--rounds", type=int, default=3, help="pairs of runs (reference, then this tree)")
    ap.add_argument("--label", default="now", help="the measurement's name in the JSON (replaced when it exists)")
    ap.add_argument("--hold", action="store_true", help="hold the bench lock for all rounds (not only for each pair)")
    ap.add_argument("--threads", type=int, default=None,
                    help="pin both trees to this many torch threads (DRAFTKIT_THREADS); default: each run's auto")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.table:
        print(table(results))
        return
    results.update(ref=args.ref, machine={"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                          "note": "shared 2-core machine; each pair run under the bench lock"})
    results.setdefault("measurements", {})
    work = Path(tempfile.mkdtemp(prefix="dk-demo-speed-"))
    ref_tree = work / "ref-tree"
    _git("worktree", "add", "--detach", str(ref_tree), args.ref)
    try:
        for tree in (ref_tree, ROOT):
            where = imported_from(tree)
            if not where.startswith(str(tree)):
                raise SystemExit(f"draftkit imports from {where}, not from {tree}: set up the venv as an editable install")
        m = {"new_commit": _git("rev-parse", "--short", "HEAD"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
             "threads": args.threads if args.threads is not None else "auto", "runs": []}
        whole = bench_lock() if args.hold else contextlib.nullcontext()
        with whole:
            for i in range(args.rounds):
                with contextlib.nullcontext() if args.hold else bench_lock():
                    for which, tree in (("ref", ref_tree), ("new", ROOT)):
                        r = one_run(tree, work, f"{which}-{i}", args.threads)
                        m["runs"].append({"tree": which, "round": i, **r})
                        print(which, i, json.dumps(r), flush=True)
                summarize(m)
                results["measurements"][args.label] = m
                RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        _git("worktree", "remove", "--force", str(ref_tree))
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))


if __name__ == "__main__":
    main()
