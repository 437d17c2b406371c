"""Speculative decoding measured in the engines users serve with, not in draftkit's own loop.

* ``hf``: transformers' assisted generation. The target alone (``generate``, greedy) against the target with the
  draft (``assistant_model``), the draft proposing exactly ``k`` tokens per round (``num_assistant_tokens=k``,
  ``num_assistant_tokens_schedule="constant"``, and no confidence stop) so the rounds are comparable with draftkit's
  MAL; a draft with another tokenizer goes through Universal Assisted Generation (``tokenizer`` +
  ``assistant_tokenizer``; with :func:`~draftkit.evaluate.hf_uag.assistant_cache_fix` for transformers 5.x). One
  untimed warm-up of each, then ``repeats`` passes over all prompts, each prompt timed both ways back to back with
  the order alternating; on CUDA the device is synchronised before every clock read.
* ``vllm``: ``LLM(target)`` against ``LLM(target, speculative_config={"method": "draft_model", ...})`` with
  vLLM's own acceptance counters (written against vLLM's documented API; needs vLLM and a GPU).

Both report tokens/s of each side, the speedup per repeat (median, min, max) and whether the speculative output
equals the target's greedy output, prompt by prompt.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import time
from typing import Any

import torch
from torch import nn

from draftkit.errors import InvalidInputError
from draftkit.evaluate.hf_uag import assistant_cache_fix
from draftkit.evaluate.latency import sync


def describe_device(model: nn.Module) -> str:
    """The device in words: the GPU's name, or the CPU with the threads torch uses."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def speedup_summary(target_tps: list[float], spec_tps: list[float]) -> dict[str, Any]:
    """Tokens/s of both sides (medians over the repeats) and the speedup of each repeat, its median and spread."""
    ratios = [s / t for s, t in zip(spec_tps, target_tps, strict=True)]
    return {
        "target_tokens_per_s": statistics.median(target_tps),
        "spec_tokens_per_s": statistics.median(spec_tps),
        "speedup": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "speedup_by_repeat": ratios,
    }


def prompt_spread(by_prompt: list[float]) -> dict[str, Any]:
    """The quartiles of the per-prompt speedups (each prompt's tokens/s with the draft over without)."""
    if len(by_prompt) < 4:
        return {"speedup_by_prompt_quartiles": None}
    q1, q2, q3 = statistics.quantiles(by_prompt, n=4)
    return {"speedup_by_prompt_quartiles": [q1, q2, q3]}


class _ForwardCounter:
    """Counts a model's forwards while ``active`` and the tokens each fed (a forward pre-hook, removed on exit)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.lengths, self.active = model, [], False

    def __enter__(self):
        def hook(_module, args, kwargs):
            if not self.active:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.lengths.append(int(ids.shape[-1]) if ids is not None else 0)

        self.handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _assistant_settings(draft: nn.Module, k: int):
    """The draft's generation config with exactly ``k`` proposals per round (the caller restores the old one)."""
    old = draft.generation_config
    cfg = copy.deepcopy(old)
    cfg.num_assistant_tokens = k
    cfg.num_assistant_tokens_schedule = "constant"
    cfg.assistant_confidence_threshold = 0.0  # transformers' default 0.4 would end rounds early
    draft.generation_config = cfg
    return old


@torch.no_grad()
def run_hf(draft: nn.Module, draft_tok, target: nn.Module, target_tok, prompt_ids: list[list[int]], *, k: int,
           max_new_tokens: int, eos_token_id: int | None, mode: str, repeats: int) -> dict[str, Any]:
    """Time transformers' ``generate`` of the target alone and with the draft as its assistant.

    Args:
        prompt_ids: the target's token ids of each rendered prompt.
        mode: ``same`` (shared vocabulary) or ``text`` (Universal Assisted Generation).
    """
    from transformers import GenerationConfig

    device = next(target.parameters()).device
    pad = target_tok.pad_token_id if target_tok.pad_token_id is not None else (eos_token_id or 0)
    # A fresh config: the target's own sampling defaults (temperature, top_p...) must not leak into greedy runs,
    # and eos_token_id=None really means "do not stop" (generate falls back to the model's EOS otherwise).
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                               eos_token_id=eos_token_id, pad_token_id=pad)
    extra = {"tokenizer": target_tok, "assistant_tokenizer": draft_tok} if mode == "text" else {}
    inputs = [torch.tensor([ids], device=device) for ids in prompt_ids]

    def generate(ids: torch.Tensor, assisted: bool) -> list[int]:
        kwargs = dict(assistant_model=draft, **extra) if assisted else {}
        with assistant_cache_fix() if assisted and extra else contextlib.nullcontext():
            out = target.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg, **kwargs)
        return out[0, ids.shape[1]:].tolist()

    def timed(ids: torch.Tensor, assisted: bool) -> tuple[float, list[int]]:
        sync(device)
        t0 = time.perf_counter()
        out = generate(ids, assisted)
        sync(device)
        return time.perf_counter() - t0, out

    n = len(inputs)
    # seconds[side][repeat][prompt]; side 0: the target alone, 1: with the draft
    seconds = [[[0.0] * n for _ in range(repeats)] for _ in range(2)]
    tokens = [[0] * n for _ in range(2)]
    outputs: list[list[list[int]]] = [[[] for _ in range(n)] for _ in range(2)]
    old = _assistant_settings(draft, k)
    try:
        for assisted in (False, True):  # warm-up: first-call allocations and lazy initialisation, untimed
            generate(inputs[0], assisted)
        with _ForwardCounter(target) as t_count, _ForwardCounter(draft) as d_count:
            for r in range(repeats):
                for i, ids in enumerate(inputs):
                    # each prompt timed both ways back to back, the order alternating: a slow spell on a shared
                    # machine falls on both sides alike
                    for side in ((0, 1) if (r + i) % 2 == 0 else (1, 0)):
                        if r == 0 and side == 1:
                            t_count.active = d_count.active = True
                        seconds[side][r][i], out = timed(ids, bool(side))
                        t_count.active = d_count.active = False
                        if r == 0:
                            outputs[side][i], tokens[side][i] = out, len(out)
    finally:
        draft.generation_config = old
    reference, speculative = outputs
    rounds = t_count.lengths
    draft_forwards = len(d_count.lengths)
    target_tps = [sum(tokens[0]) / sum(seconds[0][r]) for r in range(repeats)]
    spec_tps = [sum(tokens[1]) / sum(seconds[1][r]) for r in range(repeats)]
    by_prompt = [(tokens[1][i] / sum(seconds[1][r][i] for r in range(repeats)))
                 / (tokens[0][i] / sum(seconds[0][r][i] for r in range(repeats))) for i in range(n)]
    differing = [i for i, (a, b) in enumerate(zip(speculative, reference, strict=True)) if a != b]
    committed = sum(len(o) for o in speculative)
    return {
        "engine": "hf",
        "repeats": repeats,
        **speedup_summary(target_tps, spec_tps),
        **prompt_spread(by_prompt),
        "outputs_identical": not differing,
        "identical_prompts": len(prompt_ids) - len(differing),
        "differing_prompts": differing,
        "engine_target_forwards": len(rounds),
        "engine_draft_forwards": draft_forwards,
        "engine_tokens_per_target_forward": committed / len(rounds) if rounds else None,
    }


# --------------------------------------------------------------------------------------------
# vLLM (not run here: vLLM is not installed on the machines draftkit is developed on)
# --------------------------------------------------------------------------------------------


def check_vllm() -> None:
    """vLLM importable and a CUDA GPU present, else one line saying what is missing."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise InvalidInputError("--engine vllm needs vLLM (pip install vllm) on a machine with a CUDA GPU; "
                                "use --engine hf to measure with transformers") from None
    if not torch.cuda.is_available():
        raise InvalidInputError("--engine vllm needs a CUDA GPU (none found); use --engine hf on this machine")


def _vllm_counters(llm) -> dict[str, Any]:
    """vLLM's speculative decoding counters (``LLM.get_metrics()``, as in vLLM's examples/offline_inference/spec_decode.py)."""
    drafts = draft_tokens = accepted = 0
    per_pos: list[float] = []
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_drafts":
            drafts += metric.value
        elif metric.name == "vllm:spec_decode_num_draft_tokens":
            draft_tokens += metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens":
            accepted += metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            per_pos = [a + b for a, b in zip(per_pos or [0] * len(metric.values), metric.values, strict=True)]
    return {
        "vllm_drafts": drafts,
        "vllm_draft_tokens": draft_tokens,
        "vllm_accepted_tokens": accepted,
        "vllm_mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        "vllm_acceptance_by_position": [a / drafts for a in per_pos] if drafts else None,
    }


def run_vllm(draft_dir: str, target_ref: str, prompt_ids: list[list[int]], *, k: int, max_new_tokens: int,
             stop_at_eos: bool, repeats: int, dtype: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """Output tokens/s of ``LLM(target)`` and of ``LLM(target, speculative_config=draft_model)``, greedy."""
    import gc

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=not stop_at_eos)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    common = dict(model=target_ref, dtype=dtype, trust_remote_code=trust_remote_code, disable_log_stats=False,
                  gpu_memory_utilization=float(os.environ.get("DRAFTKIT_VLLM_GPU_MEMORY", "0.45")))
    spec_config = {"method": "draft_model", "model": draft_dir, "num_speculative_tokens": k}
    tps: dict[bool, list[float]] = {}
    outputs: dict[bool, list[list[int]]] = {}
    counters: dict[str, Any] = {}
    for assisted in (False, True):  # one engine at a time: both would not fit beside each other on every GPU
        llm = LLM(**common, **({"speculative_config": spec_config} if assisted else {}))
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up (CUDA graphs, allocator)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            runs.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
        tps[assisted] = runs
        outputs[assisted] = [list(o.outputs[0].token_ids) for o in outs]
        if assisted:
            counters = _vllm_counters(llm)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    differing = [i for i, (a, b) in enumerate(zip(outputs[True], outputs[False], strict=True)) if a != b]
    return {
        "engine": "vllm",
        "repeats": repeats,
        **speedup_summary(tps[False], tps[True]),
        "outputs_identical": not differing,
        "identical_prompts": len(prompt_ids) - len(differing),
        "differing_prompts": differing,
        **counters,
    }
