"""draftkit's REAP expert pruning against llm-compressor 0.14.0.1's ``REAPPruningModifier``: kept experts per
layer, wall time and peak RSS, on the same tiny random Qwen3-MoE and Mixtral and the same calibration tokens.

**Models.** Random float32 MoE models built from transformers config classes (seed 0): 4 decoder layers, hidden
256, 16 routed experts of width 256 per layer (Qwen3-MoE: 4 per token; Mixtral: 2 per token), the shipped tiny
teacher's tokenizer (541 tokens). Saved to disk; each tool loads the folder in its own process and environment.

**Calibration tokens.** ``draftkit.data.calibration_samples`` on the shipped tiny GSM8K-style ``train.jsonl``
(``--samples`` x ``--seqlen``), computed once here: draftkit's command reads the same file with the same settings
(the same samples: the report's token count is checked), llm-compressor gets those token ids as a tokenized
``datasets.Dataset``, unshuffled, batch size 1; ``--batch-size 1`` for draftkit too, so both run the same
per-sample forwards, and ``--compute-dtype float32`` (llm-compressor computes in float32; draftkit's ``auto``
would pick bfloat16 on a CPU with AMX). Both drop ``int(16 * sparsity)`` experts per layer, both prune a layer before its outputs
feed the next one (llm-compressor's sequential pipeline; draftkit's layer-wise pass).

**Processes.** ``draftkit prune MODEL --experts S --calib FILE -o OUT`` and llm-compressor's
``oneshot(model, dataset, REAPPruningModifier(sparsity=S, report_path=...), pipeline="sequential",
moe_calibrate_all_experts=False, output_dir=OUT)`` (its log says all-expert calibration is not needed for REAP;
it only costs time), each from the saved model to the saved output. Wall time is the whole process, peak RSS
its VmHWM. llm-compressor's per-layer mean saliency is read from its tracker (a wrapper around
``compute_retained_experts`` that records ``mean_saliency``) so differences can be explained by measurement.

    python benchmarks/reap_vs_llmcompressor.py --llmc-python /work/venv-llmc/bin/python

Writes benchmarks/results/reap_vs_llmcompressor.json (``--out``).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "reap_vs_llmcompressor.json"
TOKENIZER = ROOT / "examples" / "tiny" / "teacher"
CALIB = ROOT / "examples" / "tiny" / "data" / "train.jsonl"
_PEAK = (
    "import atexit, os\n"
    "def _peak():\n"
    "    with open('/proc/self/status') as f:\n"
    "        hwm = next(l for l in f if l.startswith('VmHWM'))\n"
    "    open(os.environ['DK_PEAK_FILE'], 'w').write(hwm.split()[1])\n"
    "atexit.register(_peak)\n"
)
_DRAFTKIT = _PEAK + (
    "import runpy, sys\n"
    "sys.argv = ['draftkit', *sys.argv[1:]]\n"
    "runpy.run_module('draftkit', run_name='__main__')\n"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(arch: str, out: Path, seed: int = 0) -> None:
    import torch
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(TOKENIZER)
    common = dict(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, intermediate_size=512, moe_intermediate_size=256, num_experts=16,
                                   num_experts_per_tok=4, head_dim=32, norm_topk_prob=True)
    elif arch == "mixtral":
        config = tf.MixtralConfig(**common, intermediate_size=256, num_local_experts=16, num_experts_per_tok=2)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)


def llmc_worker(args) -> None:
    """llm-compressor's REAP from the saved model and the token ids to the saved output (its own venv)."""
    exec(_PEAK, {})  # noqa: S102 - the VmHWM hook
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import REAPPruningModifier
    from llmcompressor.modifiers.pruning.reap.utils import REAPSaliencyTracker
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saliencies: list[dict] = []
    original = REAPSaliencyTracker.compute_retained_experts

    def recording(self, *a, **kw):
        saliencies.append({"saliency": [float(s) for s in self.mean_saliency], "tokens": [int(c) for c in self.count]})
        return original(self, *a, **kw)

    REAPSaliencyTracker.compute_retained_experts = recording  # measurement only: the choice is the tool's own
    ids = json.loads(Path(args.tokens).read_text())
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    if args.causal:  # measurement: restore the causal mask the calibration forward runs without (see the docstring)
        def causal(module, a, kw):
            if kw.get("attention_mask") is None and kw.get("hidden_states") is not None:
                n = kw["hidden_states"].shape[1]
                mask = torch.full((n, n), torch.finfo(kw["hidden_states"].dtype).min).triu(1)
                kw["attention_mask"] = mask[None, None].to(kw["hidden_states"].device)
            return a, kw

        for layer in model.model.layers:
            layer.self_attn.register_forward_pre_hook(causal, with_kwargs=True)
    oneshot(
        model=model,
        processor=tok,
        dataset=ds,
        recipe=REAPPruningModifier(sparsity=args.sparsity, report_path=args.report),
        num_calibration_samples=len(ids),
        max_seq_length=max(len(x) for x in ids),
        shuffle_calibration_samples=False,
        moe_calibrate_all_experts=False,
        pipeline="sequential",
        output_dir=args.output,
        save_compressed=False,
    )
    Path(args.result).write_text(json.dumps(saliencies))


def timed(cmd: list[str]) -> dict:
    """One process: wall seconds and its peak RSS (VmHWM, MB)."""
    peak = Path(tempfile.mkstemp(prefix="dk-peak-")[1])
    env = {**os.environ, "DK_PEAK_FILE": str(peak), "DRAFTKIT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr[-3000:]}")
    kb = int(peak.read_text())
    peak.unlink()
    return {"seconds": round(wall, 1), "peak_rss_mb": round(kb / 1024, 1), "loadavg_start": round(load, 2),
            "stdout": proc.stdout}


def compare_arch(arch: str, work: Path, args) -> dict:
    from transformers import AutoTokenizer

    from draftkit.data import CalibConfig, calibration_samples

    model_dir = work / arch
    build_model(arch, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_samples(tok, CalibConfig(path=str(CALIB), samples=args.samples, seqlen=args.seqlen),
                                  max_len=512)
    tokens = work / f"{arch}-tokens.json"
    tokens.write_text(json.dumps([s.tolist() for s in samples]))
    n_tokens = int(sum(len(s) for s in samples))

    log(f"{arch}: draftkit")
    dk = timed([sys.executable, "-c", _DRAFTKIT, "prune", str(model_dir), "--experts", str(args.sparsity),
                "--calib", str(CALIB), "--samples", str(args.samples), "--seqlen", str(args.seqlen),
                "--batch-size", "1", "--compute-dtype", args.compute_dtype, "-o", str(work / f"{arch}-dk"), "--json"])
    report = json.loads(dk.pop("stdout"))
    assert report["calibration"]["tokens"] == n_tokens, (report["calibration"], n_tokens)
    runs = {}
    for variant, extra in (("as_shipped", []), ("causal_attention_restored", ["--causal"])):
        log(f"{arch}: llm-compressor ({variant})")
        rep, sal = work / f"{arch}-{variant}-report.json", work / f"{arch}-{variant}-saliency.json"
        lc = timed([args.llmc_python, __file__, "--worker", "--model", str(model_dir), "--tokens", str(tokens),
                    "--sparsity", str(args.sparsity), "--report", str(rep), "--result", str(sal),
                    "--output", str(work / f"{arch}-{variant}"), *extra])
        lc.pop("stdout")
        kept_lc = json.loads(rep.read_text())
        stats_lc = dict(zip(kept_lc, json.loads(sal.read_text()), strict=True))
        runs[variant] = {**lc, **compare_kept(report, kept_lc, stats_lc)}
    shipped = runs["as_shipped"]
    return {
        "calibration": {"samples": len(samples), "tokens": n_tokens},
        "experts": {"before": report["experts"]["experts_before"], "after": report["experts"]["experts_after"]},
        "draftkit": dk,
        "llmcompressor": runs,
        "ratio_to_llmcompressor_as_shipped": {"time": round(dk["seconds"] / shipped["seconds"], 2),
                                              "peak_rss": round(dk["peak_rss_mb"] / shipped["peak_rss_mb"], 2)},
    }


def compare_kept(report: dict, kept_lc: dict, stats_lc: dict) -> dict:
    """Per layer: both tools' kept experts, routed-token counts equal or not, the largest relative saliency
    difference, and draftkit's relative saliency gap at the cut (how close the choice was to a tie)."""
    layers = {}
    n_drop = report["experts"]["removed_per_layer"]
    for name, entry in report["experts"]["layers"].items():
        S, S_lc = entry["saliency"], stats_lc[name]["saliency"]
        order = sorted(range(len(S)), key=lambda j: S[j])
        gap = (S[order[n_drop]] - S[order[n_drop - 1]]) / max(abs(S[order[n_drop]]), 1e-30)
        rel = max(abs(a - b) / max(abs(a), abs(b), 1e-30) for a, b in zip(S, S_lc, strict=True))
        layers[name] = {"draftkit_kept": entry["kept"], "llmcompressor_kept": kept_lc[name],
                        "same": entry["kept"] == kept_lc[name],
                        "same_routed_tokens": entry["tokens"] == stats_lc[name]["tokens"],
                        "saliency_max_rel_diff": float(f"{rel:.3g}"), "draftkit_gap_at_cut": float(f"{gap:.3g}")}
    return {"identical_kept_experts": all(v["same"] for v in layers.values()), "layers": layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--model", "--tokens", "--report", "--result", "--output"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--causal", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--llmc-python", help="python of the environment with llm-compressor 0.14.0.1")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.5, help="fraction of the experts removed per layer")
    ap.add_argument("--archs", default="qwen3_moe,mixtral")
    ap.add_argument("--compute-dtype", default="float32", help="draftkit's forwards (llm-compressor runs float32)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.worker:
        llmc_worker(args)
        return
    if not args.llmc_python:
        raise SystemExit("--llmc-python is required")
    import torch

    version = subprocess.run([args.llmc_python, "-c", "import llmcompressor, transformers, torch; print("
                              "llmcompressor.__version__, transformers.__version__, torch.__version__)"],
                             capture_output=True, text=True, check=True).stdout.split()
    result = {
        "benchmark": "reap_vs_llmcompressor",
        "settings": {"samples": args.samples, "seqlen": args.seqlen, "sparsity": args.sparsity, "batch_size": 1,
                     "draftkit_compute_dtype": args.compute_dtype},
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
                    "torch": torch.__version__},
        "peer": {"llmcompressor": version[0], "transformers": version[1], "torch": version[2]},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": {},
    }
    work = Path(tempfile.mkdtemp(prefix="dk-reap-"))
    try:
        for arch in args.archs.split(","):
            result["runs"][arch] = compare_arch(arch, work, args)
            run = result["runs"][arch]
            log(f"{arch}: identical as shipped={run['llmcompressor']['as_shipped']['identical_kept_experts']}, "
                f"causal restored={run['llmcompressor']['causal_attention_restored']['identical_kept_experts']}, "
                f"ratio={run['ratio_to_llmcompressor_as_shipped']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
