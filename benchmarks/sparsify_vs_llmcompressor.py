"""draftkit sparsify vs llm-compressor ``oneshot(SparseGPTModifier)``: wall time, peak RSS, perplexity.

Installs nothing. Each tool runs in its own process (``--llmc-python`` is the interpreter of an
environment with llm-compressor installed, since it pins torch/transformers), on the same saved model
and the same calibration token tensors, alternating draftkit and llm-compressor for each setting.

    python benchmarks/sparsify_vs_llmcompressor.py --llmc-python /work/venv-llmc/bin/python

Models: ``demo`` (examples/tiny/teacher, perplexity on examples/tiny/data/test.jsonl rendered through the
chat template) and ``random135m`` (a SmolLM2-135M-shaped Llama with random weights, timing only).
Also prints the job's FLOP floor: one forward of every decoder layer plus the Hessians, at this
machine's measured fp32 matmul rate, and each tool's time as a multiple of it.
Writes benchmarks/results/sparsify_vs_llmcompressor.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "sparsify_vs_llmcompressor.json"


# ------------------------------------------------------------------------------------------ workers


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def perplexity(model, eval_ids: list[torch.Tensor]) -> float:
    nll = 0.0
    count = 0
    for ids in eval_ids:
        ids = ids.unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1)
        nll -= lp.gather(1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def worker(args) -> None:
    from transformers import AutoModelForCausalLM

    data = torch.load(args.data, weights_only=True)
    calib: torch.Tensor = data["calib"]  # [samples, seqlen]
    nm = args.pattern != "unstructured"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    if args.worker == "draftkit":
        from draftkit.sparsify import SparsifyConfig
        from draftkit.sparsify.runner import sparsify_with_tokens

        cfg = SparsifyConfig(sparsity=None if nm else args.sparsity, pattern=args.pattern)
        model, report = sparsify_with_tokens(model, cfg, [calib])
    else:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        ds = Dataset.from_dict(
            {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
        )
        recipe = SparseGPTModifier(
            sparsity=args.sparsity,
            mask_structure=args.pattern if nm else "0:0",
            block_size=128,
            dampening_frac=0.01,
            targets=["Linear"],
            ignore=["re:.*lm_head"],
        )
        oneshot(
            model=model,
            dataset=ds,
            recipe=recipe,
            num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1],
            batch_size=1,
            shuffle_calibration_samples=False,
            output_dir=None,
        )
    seconds = time.perf_counter() - t0
    zeros = total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers." in name:
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    result = {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "sparsity": zeros / total}
    if data.get("eval"):
        result["perplexity"] = perplexity(model, data["eval"])
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ driver


def matmul_rate(n: int = 1024, reps: int = 8) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def flop_floor(config, tokens: int, seqlen: int) -> float:
    """FLOPs of one forward of every decoder layer plus the Hessians (shared by q/k/v and gate/up)."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or h // heads
    linear_params = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * i
    forward = 2 * tokens * linear_params + 4 * tokens * seqlen * heads * hd  # QKᵀ and AV
    hessians = 2 * tokens * (h * h + (heads * hd) ** 2 + h * h + i * i)
    return L * (forward + hessians)


def prepare(name: str, work: Path, samples: int, seqlen: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if name == "demo":
        from draftkit.data import (
            CalibConfig,
            calibration_samples,
            detect_columns,
            read_rows,
            render_chat,
            row_messages,
        )

        src = ROOT / "examples" / "tiny" / "teacher"
        tok = AutoTokenizer.from_pretrained(src)
        model_dir = src
        cfg = AutoModelForCausalLM.from_pretrained(src).config
        seqlen = min(seqlen, cfg.max_position_embeddings)
        calib = calibration_samples(
            tok, CalibConfig(path=str(ROOT / "examples/tiny/data/train.jsonl"), samples=samples, seqlen=seqlen)
        )
        calib = torch.stack([c for c in calib if len(c) == seqlen])
        rows = read_rows(str(ROOT / "examples/tiny/data/test.jsonl"))
        mapping = detect_columns(rows)
        eval_ids = [
            torch.tensor(tok(render_chat(tok, row_messages(r, mapping)))["input_ids"]) for r in rows[:200]
        ]
    else:
        layers = int(name.split("-")[1].rstrip("L")) if "-" in name else 30  # random135m-10L: fewer layers
        cfg = LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        model_dir = work / "random135m"
        model.save_pretrained(model_dir)
        _placeholder_tokenizer().save_pretrained(model_dir)  # oneshot insists on a processor
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(0, cfg.vocab_size, (samples, seqlen), generator=g)
        eval_ids = []
    data = work / f"{name}.pt"
    torch.save({"calib": calib, "eval": eval_ids}, data)
    return model_dir, data, cfg, calib


def _placeholder_tokenizer():
    """A word-level tokenizer with the model's special tokens; the calibration ids are given directly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def run_worker(python: str, tool: str, model_dir, data, pattern: str, sparsity: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [python, __file__, "--worker", tool, "--model", str(model_dir), "--data", str(data),
           "--pattern", pattern, "--sparsity", str(sparsity), "--result", result]
    env = {**os.environ, "DRAFTKIT_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    out = json.loads(Path(result).read_text())
    out["process_seconds"] = time.perf_counter() - t
    os.unlink(result)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["draftkit", "llmc"])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--result")
    ap.add_argument("--llmc-python", default=sys.executable, help="python of the environment with llm-compressor")
    ap.add_argument("--models", default="demo,random135m")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    rate = matmul_rate()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_dir, data, cfg, calib = prepare(name, Path(tmp), args.samples, args.seqlen)
            floor = flop_floor(cfg, calib.numel(), calib.shape[1]) / rate
            for pattern in args.patterns.split(","):
                runs = {"draftkit": [], "llmc": []}
                for _ in range(args.repeats):
                    for tool, py in (("draftkit", sys.executable), ("llmc", args.llmc_python)):
                        r = run_worker(py, tool, model_dir, data, pattern, 0.5)
                        print(f"  {name} {pattern} {tool}: {r}", file=sys.stderr)
                        runs[tool].append(r)
                row = {"model": name, "pattern": pattern, "tokens": int(calib.numel()),
                       "samples": int(calib.shape[0]), "seqlen": int(calib.shape[1]), "floor_seconds": floor}
                for tool, rs in runs.items():
                    ok = [r for r in rs if "error" not in r]
                    if not ok:
                        row[tool] = {"error": rs[0]["error"]}
                        continue
                    row[tool] = {k: statistics.median(r[k] for r in ok) for k in ok[0] if k != "error"}
                    row[tool]["x_floor"] = row[tool]["seconds"] / floor
                if "seconds" in row["draftkit"] and "seconds" in row.get("llmc", {}):
                    d, lc = row["draftkit"], row["llmc"]
                    row["ratios"] = {
                        "time": d["seconds"] / lc["seconds"],
                        "peak_rss": d["peak_rss_mb"] / lc["peak_rss_mb"],
                    }
                    if "perplexity" in d and "perplexity" in lc:
                        row["ratios"]["perplexity"] = d["perplexity"] / lc["perplexity"]
                rows.append(row)
    result = {"fp32_matmul_gflops": rate / 1e9, "torch_threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"fp32 matmul rate {rate / 1e9:.1f} GFLOP/s; tokens per run {args.samples}x{args.seqlen}")
    hdr = f"{'model':<11} {'pattern':<12} {'tool':<9} {'time s':>8} {'x floor':>8} {'RSS MB':>8} {'ppl':>8} {'sparsity':>8}"
    print(hdr)
    for row in rows:
        for tool in ("draftkit", "llmc"):
            r = row.get(tool, {})
            if "error" in r:
                print(f"{row['model']:<11} {row['pattern']:<12} {tool:<9} error: {r['error']}")
                continue
            ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
            print(f"{row['model']:<11} {row['pattern']:<12} {tool:<9} {r['seconds']:8.1f} {r['x_floor']:8.2f} "
                  f"{r['peak_rss_mb']:8.0f} {ppl:>8} {r['sparsity']:8.3f}")
        if "ratios" in row:
            print(f"{'':<11} {'':<12} ratios draftkit/llm-compressor: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
