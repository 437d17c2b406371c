"""draftkit merge against mergekit on a 1B-wide random checkpoint: wall time and peak RSS of each, and how far
their outputs are apart.

Two random bfloat16 checkpoints with Llama-3.2-1B's width (hidden 2048, MLP 8192, 32/8 heads, vocab 128256, tied
embeddings; ``--layers`` decoder layers), written shard by shard (``benchmarks/scale.py``'s writer), are merged by
``draftkit merge A B --method M`` and by ``mergekit-yaml`` (``merge_method: M``, ``dtype: bfloat16``; mergekit from
PyPI in its own venv, ``--mergekit-python``) for SLERP t = 0.5 and linear 0.5/0.5. Each tool runs as a fresh
process that reports its own VmHWM at exit; both use their defaults (draftkit: free cores as threads; mergekit:
lazy reads, one output shard at a time). Run it under the bench lock:

    flock /tmp/dk-bench.lock nice -n 10 python benchmarks/merge_vs_mergekit.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.scale import LLAMA_1B, write_random_checkpoint  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "merge_vs_mergekit.json"

_PEAK = (
    "import atexit, os, runpy, sys\n"
    "def _peak():\n"
    "    with open('/proc/self/status') as f:\n"
    "        hwm = next(l for l in f if l.startswith('VmHWM'))\n"
    "    open(os.environ['DK_PEAK_FILE'], 'w').write(hwm.split()[1])\n"
    "atexit.register(_peak)\n"
)
DRAFTKIT = _PEAK + "sys.argv = ['draftkit', *sys.argv[1:]]\nrunpy.run_module('draftkit', run_name='__main__')\n"
MERGEKIT = _PEAK + "sys.argv = ['mergekit-yaml', *sys.argv[1:]]\nfrom mergekit.scripts.run_yaml import main\nmain()\n"


def timed(python: str, code: str, args: list[str], env: dict[str, str]) -> dict[str, float]:
    peak = Path(tempfile.mkstemp(prefix="dk-peak-")[1])
    t0 = time.perf_counter()
    r = subprocess.run([python, "-c", code, *args], env={**env, "DK_PEAK_FILE": str(peak)}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {r.stderr[-3000:]}")
    out = {"seconds": round(wall, 2), "peak_rss_mb": round(int(peak.read_text()) / 1024, 1)}
    peak.unlink()
    return out


def weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a: Path, b: Path) -> dict[str, float]:
    wa, wb = weights(a), weights(b)
    shared = sorted(set(wa) & set(wb))
    worst, equal, total = 0.0, 0, 0
    for k in shared:
        d = (wa[k].float() - wb[k].float()).abs()
        worst = max(worst, float(d.max()))
        equal += int((d == 0).sum())
        total += d.numel()
    return {"tensors": len(shared), "max_abs_diff": worst, "fraction_identical": round(equal / total, 6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--mergekit-python", default=os.environ.get("DRAFTKIT_MERGEKIT_PYTHON", "/work/venv-mergekit/bin/python"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape, to check the script (not for results)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    load_start = os.getloadavg()
    work = Path(args.work or tempfile.mkdtemp(prefix="dk-merge-bench-"))
    from tests.conftest import build_tokenizer

    tok = work / "tokenizer"
    if not tok.exists():
        build_tokenizer(tok)
    size = 0
    for i, name in enumerate("ab"):
        if not (work / name / "config.json").is_file():
            shutil.rmtree(work / name, ignore_errors=True)
            shape = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, vocab_size=512) if args.smoke else LLAMA_1B
            size = write_random_checkpoint(work / name, shape, args.layers, tok, seed=i)
            cfg_file = work / name / "config.json"  # mergekit picks its architecture from config.architectures
            cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "architectures": ["LlamaForCausalLM"]}))
    size = size or sum(f.stat().st_size for f in (work / "a").glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DRAFTKIT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DRAFTKIT_THREADS", None)
    mk_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    rows = {}
    for method, mk in (("slerp", {"merge_method": "slerp", "base_model": str(work / "a"), "parameters": {"t": 0.5},
                                  "models": [{"model": str(work / "a")}, {"model": str(work / "b")}]}),
                       ("linear", {"merge_method": "linear",
                                   "models": [{"model": str(work / "a"), "parameters": {"weight": 0.5}},
                                              {"model": str(work / "b"), "parameters": {"weight": 0.5}}]})):
        import yaml

        cfg = work / f"{method}.yml"
        cfg.write_text(yaml.safe_dump({**mk, "dtype": "bfloat16"}))
        dk_out, mk_out = work / f"dk-{method}", work / f"mk-{method}"
        for d in (dk_out, mk_out):
            shutil.rmtree(d, ignore_errors=True)
        print(f"{method}: draftkit", flush=True)
        dk = timed(sys.executable, DRAFTKIT, ["merge", str(work / "a"), str(work / "b"), "--method", method,
                                              *(["--t", "0.5"] if method == "slerp" else ["--weights", "0.5,0.5"]),
                                              "-o", str(dk_out), "-q"], env)
        print(f"{method}: mergekit", flush=True)
        mkr = timed(args.mergekit_python, MERGEKIT, [str(cfg), str(mk_out), "--quiet"], mk_env)
        rows[method] = {"draftkit": dk, "mergekit": mkr, "outputs": compare(dk_out, mk_out),
                        "time_ratio": round(dk["seconds"] / mkr["seconds"], 3),
                        "rss_ratio": round(dk["peak_rss_mb"] / mkr["peak_rss_mb"], 3)}
        print(json.dumps(rows[method]), flush=True)
        for d in (dk_out, mk_out):
            shutil.rmtree(d, ignore_errors=True)
    mk_version = subprocess.run([args.mergekit_python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip()
    out = {
        "benchmark": "merge_vs_mergekit",
        "shape": f"Llama-3.2-1B width (hidden 2048, MLP 8192, 32/8 heads, vocab 128256, tied), {args.layers} layers, "
                 "random bfloat16",
        "checkpoint_bytes": size,
        "methods": rows,
        "versions": {"mergekit": mk_version, "torch": torch.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs",
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
