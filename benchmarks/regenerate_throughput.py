#!/usr/bin/env python
"""Generated tokens/s of draftkit's regeneration against one-row-at-a-time ``generate``.

Same teacher, same rows, same prompts (the teacher's chat template with the chosen distill template),
greedy decoding, the same ``max_new_tokens``. Three ways:

* ``generate, 1 row``: ``model.generate`` on each row alone (the baseline of the issue);
* ``generate, batches of 16``: ``model.generate`` on left-padded batches of 16 rows in dataset order;
* ``draftkit HFEngine``: draftkit's decoder (rows longest first, finished rows leave the batch, the batch
  refills, padding-only cache columns are cut, prompt logits only for the last position).

Each way runs ``--repeats`` times, interleaved; medians are reported, and the median of the per-repeat
ratios (each repeat runs the three ways back to back, so the ratio is steadier on a shared machine). Tokens count every generated token
up to and including EOS. Writes ``benchmarks/results/regenerate_throughput.json``.

Usage::

    python benchmarks/regenerate_throughput.py --teacher examples/tiny/teacher --rows 64
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from draftkit.atomic import atomic_write_json
from draftkit.checkpoint import load_model_and_tokenizer
from draftkit.distill import DistillConfig, HFEngine, load_examples
from draftkit.distill.regenerate import teacher_prompt_ids
from draftkit.distill.templates import DEFAULT_TEMPLATE, INSTRUCTION_ONLY_TEMPLATE
from draftkit.modeling import count_parameters
from draftkit.provenance import versions

ROOT = Path(__file__).resolve().parent.parent


def count_new(ids: list[int], eos: set[int]) -> int:
    for i, t in enumerate(ids):
        if t in eos:
            return i + 1
    return len(ids)


@torch.inference_mode()
def run_single(model, tok, prompts, max_new, eos):
    t0 = time.perf_counter()
    outs = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        outs.append(out[0, len(p):].tolist())
    dt = time.perf_counter() - t0
    toks = [o[: count_new(o, eos)] for o in outs]
    return sum(len(t) for t in toks), dt, toks


@torch.inference_mode()
def run_batched_generate(model, tok, prompts, max_new, eos, batch=16):
    t0 = time.perf_counter()
    outs = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s: s + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        outs += out[:, width:].tolist()
    dt = time.perf_counter() - t0
    toks = [o[: count_new(o, eos)] for o in outs]
    return sum(len(t) for t in toks), dt, toks


@torch.inference_mode()
def run_engine(model, tok, prompts, max_new, batch):
    engine = HFEngine(model, tok, max_new_tokens=max_new, batch_size=batch)
    t0 = time.perf_counter()
    got = {}
    for group in engine.generate(prompts):
        for g in group:
            got[g.pos] = g
    dt = time.perf_counter() - t0
    return sum(g.new_tokens for g in got.values()), dt, [got[i].text for i in range(len(prompts))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=str(ROOT / "examples" / "tiny" / "teacher"))
    p.add_argument("--data", default=str(ROOT / "examples" / "tiny" / "data" / "train.jsonl"))
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=64, help="draftkit's batch")
    p.add_argument("--template", choices=["default", "instruction-only"], default="instruction-only")
    p.add_argument("--shape", choices=["teacher", "smollm2-135m"], default="teacher",
                   help="smollm2-135m: a randomly initialised Llama with SmolLM2-135M's shape (no download), "
                   "prompts from the teacher's tokenizer; random weights rarely stop early, so every row runs "
                   "to --max-new-tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights dtype for every method (bfloat16 uses AMX/AVX512-BF16 matmuls where the CPU has them)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "regenerate_throughput.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    template = DEFAULT_TEMPLATE if args.template == "default" else INSTRUCTION_ONLY_TEMPLATE
    cfg = DistillConfig(dataset=args.data, teacher=args.teacher, limit=args.rows, template=template)
    examples = load_examples(cfg)
    model, tok = load_model_and_tokenizer(args.teacher)
    if args.shape == "smollm2-135m":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    model = model.to(getattr(torch, args.dtype))
    prompts = [teacher_prompt_ids(tok, e, template) for e in examples]
    eos = {tok.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])

    runs = {"generate, 1 row": [], "generate, batches of 16": [], "draftkit HFEngine": []}
    texts = {}
    run_engine(model, tok, prompts[:4], 4, 4)  # warm-up
    for r in range(args.repeats):
        n, dt, toks = run_single(model, tok, prompts, args.max_new_tokens, eos)
        runs["generate, 1 row"].append((n, dt))
        texts["single"] = [tok.decode(t, skip_special_tokens=True) for t in toks]
        n, dt, toks = run_batched_generate(model, tok, prompts, args.max_new_tokens, eos)
        runs["generate, batches of 16"].append((n, dt))
        n, dt, out = run_engine(model, tok, prompts, args.max_new_tokens, args.batch_size)
        runs["draftkit HFEngine"].append((n, dt))
        texts["engine"] = out
        print(f"repeat {r + 1}: " + ", ".join(f"{k}: {v[-1][0] / v[-1][1]:.1f} tok/s" for k, v in runs.items()), flush=True)

    same = sum(a == b for a, b in zip(texts["single"], texts["engine"], strict=True))
    result = {
        "teacher": args.teacher if args.shape == "teacher" else "random Llama, SmolLM2-135M shape",
        "teacher_params": count_parameters(model),
        "rows": len(prompts),
        "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
        "max_new_tokens": args.max_new_tokens,
        "template": args.template,
        "draftkit_batch_size": args.batch_size,
        "dtype": args.dtype,
        "torch_threads": args.threads,
        "repeats": args.repeats,
        "machine": f"{platform.machine()} CPU, shared with other jobs",
        "versions": versions(),
        "methods": {},
        "engine_text_equals_single_row_generate": f"{same}/{len(prompts)}",
    }
    base = statistics.median(n / dt for n, dt in runs["generate, 1 row"])
    for k, v in runs.items():
        tps = [n / dt for n, dt in v]
        result["methods"][k] = {
            "tokens": v[0][0],
            "tokens_per_second_median": round(statistics.median(tps), 1),
            "tokens_per_second_all": [round(x, 1) for x in tps],
            "speedup_vs_single_row_median": round(statistics.median(tps) / base, 2),
            # the load of a shared machine drifts: ratios within one repeat (run back to back) are steadier
            "speedup_per_repeat": [round((n / dt) / (n1 / dt1), 2)
                                   for (n, dt), (n1, dt1) in zip(v, runs["generate, 1 row"], strict=True)],
        }
        result["methods"][k]["speedup_paired_median"] = round(statistics.median(result["methods"][k]["speedup_per_repeat"]), 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"\n{'method':28s} {'tokens':>7s} {'tok/s (median)':>15s} {'speedup':>8s} {'paired':>7s}")
    for k, m in result["methods"].items():
        print(f"{k:28s} {m['tokens']:7d} {m['tokens_per_second_median']:15.1f} {m['speedup_vs_single_row_median']:7.2f}x"
              f" {m['speedup_paired_median']:6.2f}x")
    print(f"engine output equals single-row generate on {same}/{len(prompts)} rows; written to {args.out}")


if __name__ == "__main__":
    main()
