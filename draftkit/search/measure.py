"""What the search measures of each candidate: MAL at every k up to ``k``, acceptance by position, the measured
per-token cost on this device and the latency cost model's predicted speedup; for the frontier, the speedup an
engine measures.

MAL is replayed (:func:`draftkit.evaluate.acceptance.greedy_steps`) from the target's greedy output, computed
once per prompt set and shared by every candidate, and one teacher-forced forward of the draft per prompt: for
greedy verification this gives the steps :func:`draftkit.evaluate.decoding.speculative_generate` takes (the
``spec`` stage), at every k at once. A draft with another vocabulary is measured by ``spec``'s own loop
(:func:`draftkit.evaluate.spec.run_spec`, text mode) at ``k`` only.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from draftkit.evaluate.acceptance import acceptance_stats, greedy_steps


@dataclass
class PromptSet:
    """One prompt set, rendered and encoded for the target, with the target's greedy continuation of each."""

    path: str
    texts: list[str]
    ids: list[list[int]]
    reference: list[list[int]]  # max_new_tokens + k greedy tokens of the target, not stopped at EOS


def read_prompt_set(path: str, target: nn.Module, tokenizer, *, limit: int | None,
                    chat: bool) -> tuple[list[str], list[list[int]]]:
    """Prompt texts and ids exactly as ``spec`` reads them (chat template, texts beyond the context cut)."""
    from draftkit.data import model_max_length
    from draftkit.evaluate.spec import encode_prompt, read_prompts
    from draftkit.textcap import TextCap

    cap = TextCap(tokenizer, model_max_length(target) or 131072, path)
    texts = [cap(t) for t in read_prompts(path, tokenizer, chat=chat, limit=limit)]
    cap.report()
    return texts, [encode_prompt(tokenizer, t) for t in texts]


@torch.no_grad()
def target_reference(target: nn.Module, ids: list[list[int]], n: int) -> list[list[int]]:
    """The target's greedy continuation of each prompt, ``n`` tokens, one token per forward (as ``spec``'s
    lossless reference), not stopped at EOS so that the replay of every k has the tokens it needs."""
    from draftkit.evaluate.decoding import greedy_generate

    return [greedy_generate(target, p, max_new_tokens=n, eos_token_id=None) for p in ids]


@torch.no_grad()
def draft_next(draft: nn.Module, ids: list[list[int]], reference: list[list[int]]) -> list[list[int]]:
    """``out[i][j]``: the draft's greedy next token after ``ids[i] + reference[i][:j]`` (one forward per prompt)."""
    device = next(draft.parameters()).device
    out = []
    for p, r in zip(ids, reference, strict=True):
        seq = torch.tensor([p + r], device=device)
        logits = draft(input_ids=seq, use_cache=False).logits[0]
        out.append(logits[len(p) - 1:].float().argmax(-1).tolist())
    return out


def replay(nexts: list[list[int]], reference: list[list[int]], *, k_max: int, max_new_tokens: int,
           eos: int | None) -> dict[str, Any]:
    """MAL at every k in 1..k_max, and the full statistics (acceptance by position) at ``k_max``."""
    mal_by_k, stats = [], {}
    for k in range(1, k_max + 1):
        steps: list[tuple[int, int]] = []
        committed = 0
        for dn, ref in zip(nexts, reference, strict=True):
            s, c = greedy_steps(dn, ref, k=k, max_new_tokens=max_new_tokens, eos_token_id=eos)
            steps += s
            committed += c
        stats = acceptance_stats(steps, k, committed)
        mal_by_k.append(stats["mal_per_step"])
    return {"mal_by_k": mal_by_k, **stats}


def measure(draft: nn.Module, draft_tok, target: nn.Module, target_tok, sets: list[PromptSet], *, k: int,
            max_new_tokens: int, eos: int | None, spec_cfg=None) -> dict[str, Any]:
    """Every figure of one candidate. ``sets[0]`` is the main prompt set (cost model, predicted speedup); the
    others report their MAL beside. ``spec_cfg``: a draft with another vocabulary, measured by ``spec``'s loop."""
    from draftkit.evaluate.cost import macs_per_token
    from draftkit.evaluate.payoff import cost_model
    from draftkit.evaluate.spec import vocab_mode

    t0 = time.perf_counter()
    mode = vocab_mode(draft_tok, target_tok, "auto")
    main = sets[0]
    if mode == "same":
        res = replay(draft_next(draft, main.ids, main.reference), main.reference, k_max=k,
                     max_new_tokens=max_new_tokens, eos=eos)
        res["cost_model"] = cost_model(draft, target, [(p, p) for p in main.ids], k=k,
                                       alpha=res["acceptance_by_position"])
        more = {s.path: replay(draft_next(draft, s.ids, s.reference), s.reference, k_max=k,
                               max_new_tokens=max_new_tokens, eos=eos)["mal_by_k"] for s in sets[1:]}
    else:
        from draftkit.evaluate.spec import run_spec

        rep = run_spec(draft, draft_tok, target, target_tok, spec_cfg)
        res = {key: rep[key] for key in ("mal_per_step", "mal", "acceptance_by_position", "acceptance_rate",
                                         "committed_tokens", "target_forwards", "full_steps", "cost_model")}
        res["mal_by_k"] = [None] * (k - 1) + [rep["mal_per_step"]]
        more = {}
    cm = res.pop("cost_model")
    context = int(statistics.fmean(len(p) + max_new_tokens / 2 for p in main.ids))
    return {
        "mode": mode,
        **{key: res.get(key) for key in ("mal_by_k", "mal_per_step", "mal", "acceptance_by_position",
                                         "conditional_acceptance_by_position", "acceptance_rate", "full_steps")},
        "more_prompts_mal_by_k": more,
        "c": cm["c"], "v": cm["v"],
        "draft_forward_ms": cm["draft_forward_ms"], "target_forward_ms": cm["target_forward_ms"],
        "predicted_speedup_by_k": cm["predicted_speedup_by_k"],
        "best_k": cm.get("best_k"), "predicted_speedup": cm.get("best_k_predicted_speedup"),
        "macs_nonzero_rel": macs_per_token(draft, context, nonzero=True) / macs_per_token(target, context, nonzero=True),
        "macs_rel": macs_per_token(draft, context) / macs_per_token(target, context),
        "layers": draft.config.get_text_config().num_hidden_layers,
        "measure_seconds": round(time.perf_counter() - t0, 3),
    }


def engine_speedup(draft: nn.Module, draft_tok, target: nn.Module, target_tok, ids: list[list[int]], *, k: int,
                   max_new_tokens: int, eos: int | None, repeats: int) -> dict[str, Any]:
    """The speedup transformers' assisted generation measures with this draft (``spec --engine hf``)."""
    from draftkit.evaluate.engines import run_hf
    from draftkit.evaluate.spec import vocab_mode

    mode = vocab_mode(draft_tok, target_tok, "auto")
    rep = run_hf(draft, draft_tok, target, target_tok, ids, k=k, max_new_tokens=max_new_tokens, eos_token_id=eos,
                 mode=mode, repeats=repeats)
    return {key: rep.get(key) for key in ("speedup", "speedup_min", "speedup_max", "target_tokens_per_s",
                                          "spec_tokens_per_s", "outputs_identical", "repeats")} | {"k": k,
                                                                                                   "prompts": len(ids)}
