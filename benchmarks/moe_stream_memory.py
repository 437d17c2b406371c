"""Streamed MoE runs: peak RSS against depth and against the printed estimate.

    flock /tmp/dk-bench.lock .venv/bin/python benchmarks/moe_stream_memory.py

Random bf16 Qwen3-MoE checkpoints (hidden 1024, 32 routed experts of width 384, top-4, 16/4 heads, vocabulary
32000, untied head), written tensor by tensor in the layout ``save_pretrained`` stores (one 2-D weight per expert
and projection), with 4 and 8 layers. Each checkpoint runs ``prune --experts 0.5`` (REAP) and ``sparsify --method
wanda --sparsity 0.5`` with ``--stream on`` (8 samples x 128 tokens), and the 8-layer one the same prune resident
(``--stream off``). Every command is its own ``draftkit`` process; peak RSS is its VmHWM
(``benchmarks/scale.py``). Targets: a streamed run's peak grows by well under one layer's expert weights per
added layer, stays below the resident run's, and the printed host estimate is within 25% of the peak.
Writes ``benchmarks/results/moe_stream_memory.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.scale import make_tokenizer_and_data, per_layer_growth, write_plan  # noqa: E402
from benchmarks.scale import run as run_command  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "moe_stream_memory.json"
SHAPE = dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=384, num_experts=32,
             num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000,
             max_position_embeddings=4096, tie_word_embeddings=False, norm_topk_prob=True)


def write_moe_checkpoint(out: Path, layers: int, tokenizer_dir: Path, *, dtype=torch.bfloat16, seed: int = 0) -> int:
    """A random Qwen3-MoE checkpoint, one stored tensor at a time (per-expert names, as save_pretrained)."""
    from transformers import Qwen3MoeConfig
    from transformers.core_model_loading import revert_weight_conversion

    from draftkit.checkpoint import empty_model

    config = Qwen3MoeConfig(**SHAPE, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    skeleton = empty_model(config)
    meta = {k: torch.empty(v.shape, dtype=dtype, device="meta") for k, v in skeleton.state_dict().items()}
    plan = [(k, tuple(v.shape), dtype) for k, v in revert_weight_conversion(skeleton, meta).items()]
    return write_plan(out, config, plan, tokenizer_dir, seed=seed)


def measure(cmd: list[str]) -> dict:
    r = run_command(cmd, lock=False)  # the whole script runs under the bench lock
    host = (r.get("estimate_gb") or {}).get("host")
    r["estimate_host_gb"] = host
    r["estimate_over_peak"] = round(host / (r["peak_rss_mb"] * 2**20 / 1e9), 3) if host else None
    return r


def main() -> None:
    results: dict = {"shape": SHAPE, "dtype": "bfloat16", "calibration": "8 samples x 128 tokens",
                     "machine": {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
                                 "note": "shared 2-core machine, run under the bench lock: peak RSS is the figure compared"},
                     "rows": []}
    with tempfile.TemporaryDirectory(prefix="dk-moe-mem-") as tmp:
        work = Path(tmp)
        tok, data = make_tokenizer_and_data(work)
        calib = ["--calib", str(data), "--samples", "8", "--seqlen", "128", "-q"]
        for layers in (4, 8):
            ckpt = work / f"moe-{layers}"
            size = write_moe_checkpoint(ckpt, layers, tok)
            row: dict = {"layers": layers, "checkpoint_gb": round(size / 1e9, 3),
                         "expert_weights_per_layer_mb": round(3 * 32 * 1024 * 384 * 2 / 2**20, 1)}
            for name, args in (("prune_experts", ["prune", "--experts", "0.5"]),
                               ("wanda", ["sparsify", "--method", "wanda", "--sparsity", "0.5"])):
                row[name] = measure([*args, str(ckpt), *calib, "--stream", "on", "-o", str(work / f"o-{name}-{layers}")])
                shutil.rmtree(work / f"o-{name}-{layers}")
            if layers == 8:
                row["prune_experts_resident"] = measure(["prune", "--experts", "0.5", str(ckpt), *calib,
                                                         "--stream", "off", "-o", str(work / "o-res")])
                shutil.rmtree(work / "o-res")
            results["rows"].append(row)
            print(json.dumps(row, indent=1), flush=True)
            shutil.rmtree(ckpt)
    rows = results["rows"]
    results["growth_mb_per_layer"] = {k: per_layer_growth(rows, k) for k in ("prune_experts", "wanda")}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["growth_mb_per_layer"]))


if __name__ == "__main__":
    main()
