"""Merging self-distilled drafts of SmolLM2-135M-Instruct: two students of one pruned model, each
self-distilled on a different prompt set, and their SLERP, measured by MAL against the target on both sets.

Claim beside it (Self-Data Distillation, Thangarasa et al. 2024): "combining self-data distilled models through
model merging yields enhanced quality retention": students of the same pruned model, self-distilled on different
datasets and merged by SLERP, retain more than either. The paper measures task accuracy of the merged model; this
measures what a draft is for, MAL (tokens per verification step, greedy, k = 4) against the target.

Models, all through draftkit's own API:

    pruned   the target with 6 of 30 blocks dropped by angular distance (calibration: GSM8K train rows), no healing
    s_gsm    pruned + SDD on the first GSM8K train questions, answered by the target (greedy, chat template)
    s_mix    pruned + SDD on the first rows of ../shared/data/prompts/mixed_instructions.jsonl, answered by the target
    merge    draftkit merge s_gsm s_mix --method slerp --t 0.5 (and linear t = 0.5 beside it)

Measured on held-out prompts of both sets: the first GSM8K test questions, and the mixed prompts not used for
training. The target's greedy reference is computed once per set; each draft's MAL is replayed from one
teacher-forced forward (``greedy_steps``, as ``benchmarks/sd2_smollm2.py`` does, which checks it against the real
decoding loop). Small row counts (CPU, 2 shared cores): the JSON records them. Everything is cached in ``--work``.

    flock /tmp/dk-bench.lock nice -n 19 python benchmarks/merge_smollm2.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sd2_smollm2 import (  # noqa: E402 - the same target, greedy reference and replay helpers
    GSM8K,
    WHEEL,
    batched_greedy,
    ensure_target,
    find_gguf,
    log,
    teacher_forced_next,
)

RESULTS = ROOT / "benchmarks" / "results"
MIXED = GSM8K.parent / "prompts" / "mixed_instructions.jsonl"
PAPER = ("Self-Data Distillation (Thangarasa et al. 2024): students of one pruned model self-distilled on different "
         "datasets and merged by SLERP retain more quality than either student (task accuracy)")


def chat_ids(tok, prompts: list[str]) -> list[list[int]]:
    from draftkit.evaluate.proposers import encode_prompt

    return [encode_prompt(tok, tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True)) for p in prompts]


def target_answers(target, tok, prompts: list[str], max_new: int, pad: int) -> list[dict[str, Any]]:
    """The target's own greedy answers (cut at EOS): the self-distillation rows."""
    eos = tok.eos_token_id
    outs = batched_greedy(target, chat_ids(tok, prompts), max_new, pad)
    rows = []
    for p, o in zip(prompts, outs, strict=True):
        o = o[: o.index(eos)] if eos in o else o
        rows.append({"prompt": p, "response": tok.decode(o, skip_special_tokens=True).strip(), "finished": len(o) < max_new})
    return rows


def reference(target, tok, prompts: list[str], n: int, pad: int) -> dict[str, Any]:
    """The target's greedy continuation (``n`` tokens, cut where a teacher-forced forward disagrees)."""
    ids = chat_ids(tok, prompts)
    ref = batched_greedy(target, ids, n, pad)
    tf = teacher_forced_next(target, ids, ref, pad)
    cut = 0
    for i, (r, t) in enumerate(zip(ref, tf, strict=True)):
        j = next((j for j in range(len(r)) if r[j] != t[j]), None)
        if j is not None:
            ref[i] = r[:j] + [t[j]]
            cut += 1
    return {"ids": ids, "ref": ref, "cut": cut}


def mal(model, ref: dict[str, Any], pad: int, eos: int, k: int, max_new: int) -> dict[str, Any]:
    from draftkit.evaluate.acceptance import acceptance_stats, greedy_steps

    draft_next = teacher_forced_next(model, ref["ids"], ref["ref"], pad)
    steps, committed = [], 0
    for dn, r in zip(draft_next, ref["ref"], strict=True):
        s, c = greedy_steps(dn, r, k=k, max_new_tokens=max_new, eos_token_id=eos)
        steps += s
        committed += c
    st = acceptance_stats(steps, k, committed)
    return {"mal_per_step": round(st["mal_per_step"], 4), "mal": round(st["mal"], 4), "steps": len(steps),
            "acceptance_by_position": [round(v, 4) if v is not None else None for v in st["acceptance_by_position"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf")
    ap.add_argument("--target-cache", default=str(Path.home() / ".cache" / "draftkit" / "sd2" / "smollm2-135m-instruct"))
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "draftkit" / "merge-smollm2"))
    ap.add_argument("--gsm-rows", type=int, default=48, help="GSM8K train questions for s_gsm")
    ap.add_argument("--mix-rows", type=int, default=60, help="mixed prompts for s_mix (the rest are measured)")
    ap.add_argument("--gsm-prompts", type=int, default=20, help="GSM8K test questions measured")
    ap.add_argument("--answer-tokens", type=int, default=160, help="max new tokens of the target's training answers")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per MAL prompt")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train-batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=224)
    ap.add_argument("--drop", type=int, default=6)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--t", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "merge_smollm2.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DRAFTKIT_NO_PROGRESS", "1")
    t_start, load_start = time.time(), os.getloadavg()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftkit.data import CalibConfig
    from draftkit.distill import DistillConfig, distill_model
    from draftkit.merge import MergeConfig, merge_checkpoints
    from draftkit.prune import PruneConfig, prune_model
    from draftkit.stages import LoadConfig

    target_dir = ensure_target(find_gguf(args.gguf), Path(args.target_cache))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(target_dir)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos

    gsm_train = [json.loads(x)["question"] for x in (GSM8K / "train.jsonl").read_text().splitlines()[: args.gsm_rows]]
    gsm_test = [json.loads(x)["question"] for x in (GSM8K / "test.jsonl").read_text().splitlines()[: args.gsm_prompts]]
    mixed = [json.loads(x)["prompt"] for x in MIXED.read_text().splitlines() if x.strip()]
    mix_train, mix_test = mixed[: args.mix_rows], mixed[args.mix_rows:]

    def cached(name: str, fn):
        f = work / f"{name}.json"
        if f.exists():
            return json.loads(f.read_text())
        log(name)
        value = fn()
        f.write_text(json.dumps(value))
        return value

    rows = {"gsm": cached(f"answers-gsm-{args.gsm_rows}", lambda: target_answers(target, tok, gsm_train, args.answer_tokens, pad)),
            "mix": cached(f"answers-mix-{args.mix_rows}", lambda: target_answers(target, tok, mix_train, args.answer_tokens, pad))}
    refs = {"gsm8k": cached(f"ref-gsm-{args.gsm_prompts}", lambda: reference(target, tok, gsm_test, args.max_new_tokens + 8, pad)),
            "mixed": cached(f"ref-mix-{args.mix_rows}", lambda: reference(target, tok, mix_test, args.max_new_tokens + 8, pad))}

    def saved(path: Path, make) -> Path:
        if not (path / "config.json").is_file():
            model, report = make()
            tmp = path.with_name(path.name + ".tmp")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "build.json").write_text(json.dumps(report, default=str))
            tmp.rename(path)
        return path

    calib_file = work / "calib-gsm.jsonl"
    calib_file.write_text("".join(json.dumps({"text": q}) + "\n" for q in gsm_train))
    calib = CalibConfig(path=str(calib_file), samples=args.calib_samples, seqlen=256, seed=args.seed)
    def prune():
        log(f"prune {args.drop} blocks (angular)")
        model, rep = prune_model(copy.deepcopy(target), tok, PruneConfig(layers=args.drop, method="angular", calib=calib))
        return model, {k: rep[k] for k in ("dropped_layers", "layers_after", "params_after")}

    pruned = saved(work / "pruned", prune)

    def student(name: str) -> Path:
        data = work / f"rows-{name}.jsonl"
        data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                                for r in rows[name] if r["response"]))

        def make():
            log(f"s_{name}: SDD of the pruned model on {data.name}")
            model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
            model.train()
            cfg = DistillConfig(dataset=str(data), regenerate=False, epochs=args.epochs, lr=args.lr, lr_schedule="cosine",
                                warmup=0.1, train_batch_size=args.train_batch_size, grad_accum=1, max_length=args.max_length,
                                eval_fraction=0.0, seed=args.seed, checkpoints=False, work_dir=str(work / f"train-{name}"))
            model, rep = distill_model(model, tok, cfg)
            return model, {k: rep["train"].get(k) for k in ("examples", "steps", "train_loss_first", "train_loss_last", "seconds")}
        return saved(work / f"s_{name}", make)

    s_gsm, s_mix = student("gsm"), student("mix")
    merges = {}
    for method in ("slerp", "linear"):
        out = work / f"merge-{method}"
        if not (out / "config.json").is_file():
            log(f"merge ({method})")
            cfg = MergeConfig(method=method, t=args.t) if method == "slerp" else MergeConfig(method=method, weights=[1 - args.t, args.t])
            merge_checkpoints([str(s_gsm), str(s_mix)], cfg, out=out, load=LoadConfig(threads=args.threads), overwrite=True)
        merges[method] = out
    models = {"target": None, "pruned": pruned, "s_gsm": s_gsm, "s_mix": s_mix,
              "merge_slerp": merges["slerp"], "merge_linear": merges["linear"]}
    results: dict[str, Any] = {}
    for name, path in models.items():
        def measure(path=path):
            model = target if path is None else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            return {s: mal(model, refs[s], pad, eos, args.k, args.max_new_tokens) for s in refs}
        results[name] = cached(f"mal-{name}-{args.k}", measure)
    table = {n: {s: r[s]["mal_per_step"] for s in refs} for n, r in results.items()}
    best_student = {s: max(table["s_gsm"][s], table["s_mix"][s]) for s in refs}
    out = {
        "benchmark": "merge_smollm2",
        "target": f"SmolLM2-135M-Instruct, Q4_1 GGUF ({WHEEL}) dequantized to float32",
        "data": {"s_gsm": f"first {args.gsm_rows} GSM8K train questions, the target's greedy answers",
                 "s_mix": f"first {args.mix_rows} of {len(mixed)} mixed_instructions prompts, the target's greedy answers",
                 "measured": {"gsm8k": f"first {len(gsm_test)} GSM8K test questions",
                              "mixed": f"the other {len(mix_test)} mixed_instructions prompts"}},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work", "target_cache", "gguf")},
        "mal_definition": f"mal_per_step: tokens per verification step with k = {args.k} proposals, bonus included "
                          "(greedy, replayed from one teacher-forced forward of the draft)",
        "reference_cut": {s: refs[s]["cut"] for s in refs},
        "builds": {n: json.loads((p / "build.json").read_text()) for n, p in (("s_gsm", s_gsm), ("s_mix", s_mix))},
        "mal_per_step": table,
        "models": results,
        "merge_report": {m: json.loads((p / "draftkit.json").read_text())["facts"] for m, p in merges.items()},
        "claims": {
            "paper": PAPER,
            "slerp_minus_best_student": {s: round(table["merge_slerp"][s] - best_student[s], 4) for s in refs},
            "slerp_above_both_students_on": [s for s in refs if table["merge_slerp"][s] > best_student[s]],
            "slerp_mean_minus_best_student_mean": round(
                sum(table["merge_slerp"].values()) / 2 - max(sum(table[x].values()) / 2 for x in ("s_gsm", "s_mix")), 4),
        },
        "machine": f"{platform.machine()} CPU, 2 cores shared with other jobs (figures do not depend on speed)",
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.time() - t_start, 1),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'model':<14}" + "".join(f"{s:>10}" for s in refs))
    for n, row in table.items():
        print(f"{n:<14}" + "".join(f"{row[s]:>10.3f}" for s in refs))
    print(json.dumps(out["claims"], indent=2))


if __name__ == "__main__":
    main()
