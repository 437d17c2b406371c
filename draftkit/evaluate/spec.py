"""``draftkit spec``: speculative decoding of a draft against a target, and its report.

The parts live in their own modules: :mod:`~draftkit.evaluate.proposers` (the draft side, KV caches),
:mod:`~draftkit.evaluate.decoding` (the loop: greedy verification or speculative sampling),
:mod:`~draftkit.evaluate.acceptance` (MAL and acceptance by position, counting only proposed positions) and
:mod:`~draftkit.evaluate.cost` (MACs and the expected speedup). This module reads the prompts and runs them.

Mean accepted length (MAL): tokens committed per verification step, bonus included; a model drafting for
itself reaches ``k + 1`` on every step that proposed ``k`` tokens (``mal_per_step``), and ``mal`` divides all
committed tokens by all target forwards (tail and EOS steps included).

Draft and target may use different tokenizers (Universal Assisted Generation, greedy only): the committed
tokens are always target tokens; the draft sees the committed text re-tokenized with its own tokenizer, and
its proposal is turned back into target tokens through text.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from torch import nn

from draftkit import console
from draftkit.data import model_max_length
from draftkit.errors import DataError, InvalidInputError
from draftkit.evaluate.acceptance import acceptance_stats
from draftkit.evaluate.cost import expected_speedup, macs_per_token
from draftkit.evaluate.decoding import greedy_generate, speculative_accept, speculative_generate
from draftkit.evaluate.dynamic import TapOut
from draftkit.evaluate.engines import check_vllm, describe_device, run_hf, run_vllm
from draftkit.evaluate.payoff import compare, cost_model, dynamic_summary
from draftkit.evaluate.proposers import SameVocabProposer, TextProposer, Timer, encode_prompt
from draftkit.textcap import TextCap

_Timer = Timer  # the name before the split

__all__ = [
    "SameVocabProposer", "SpecConfig", "TextProposer", "Timer", "check_spec", "check_text_fallback", "encode_prompt",
    "greedy_generate", "macs_per_token", "read_prompts", "run_spec", "spec_stage", "speculative_accept",
    "speculative_generate", "vocab_mode",
]

PROMPT_COLUMNS = ("messages", "conversations", "prompt", "question", "instruction", "query", "problem", "input", "text")


class SpecConfig(BaseModel):
    """Settings of ``draftkit spec``."""

    model_config = ConfigDict(extra="forbid")
    # set from --trust-remote-code (load.trust_remote_code) by :func:`draftkit.stages.trusting`: the other model
    # this stage loads (eval's baseline, spec's target, export's serving target) may run its repository's code
    _trust_remote_code: bool = PrivateAttr(False)
    _draft_dir: str | None = PrivateAttr(None)  # the saved folder the draft in memory equals (the stage's input)

    target: str = Field(..., description="the target model the draft speculates for (directory, .gguf file, alias or hub id)")
    prompts: str = Field(..., description="prompts: a file (.jsonl/.json/.csv/.parquet with a prompt/question/messages/text "
                         "column, or .txt) or a hub dataset id owner/name[:config]")
    split: str = Field("train", description="dataset split when prompts is a hub dataset")
    column: str | None = Field(None, description="column holding the prompts (default: the first of "
                               "messages, prompt, question, instruction, text...); a list of turns uses the first")
    k: int | Literal["dynamic"] = Field(
        4, description="tokens the draft proposes per step, or dynamic: a bandit over stopping policies picks each "
        "step's length, at most --k-max (TapOut; draftkit engine)")
    k_max: int = Field(8, ge=1, description="with --k dynamic: the most tokens one step proposes")
    engine: Literal["draftkit", "hf", "vllm"] = Field(
        "draftkit", description="where the speedup is measured: draftkit (its own loop, the reference for MAL), hf "
        "(transformers assisted generation) or vllm (needs vLLM and a GPU); MAL always comes from draftkit's loop")
    repeats: int = Field(3, ge=1, description="timed passes over all prompts of the target alone and with the draft "
                         "(engines hf and vllm), after one warm-up")
    max_new_tokens: int = Field(128, ge=1, description="tokens to generate per prompt")
    limit: int | None = Field(None, ge=1, description="use at most this many prompts")
    mode: Literal["auto", "same", "text"] = Field(
        "auto", description="same: shared vocabulary; text: re-tokenize through text (different tokenizers); auto: pick"
    )
    chat: bool = Field(True, description="render prompts with the target's chat template (when it has one)")
    stop_at_eos: bool = Field(True, description="stop a prompt at the target's end-of-sequence token")
    check_lossless: bool = Field(
        True, description="also run the target's own greedy decoding and compare outputs (greedy only)"
    )
    temperature: float = Field(
        0.0, ge=0.0, description="0: greedy verification; > 0: speculative sampling at this temperature (rejection "
        "rule of Leviathan et al. 2023), same vocabulary only"
    )
    seed: int = Field(0, description="seed of the sampling (with --temperature > 0)")
    # quality gates (draftkit.gates): judged on the report, not part of the stage's fingerprint
    min_mal: float | None = Field(None, gt=0, description="fail (exit code 3) when the MAL (committed tokens per "
                                  "target forward, `mal`) is below this")
    min_acceptance: float | None = Field(None, gt=0, le=1, description="fail (exit code 3) when the acceptance rate "
                                         "(accepted / proposed draft tokens) is below this")
    min_speedup: float | None = Field(None, gt=0, description="fail (exit code 3) when the speedup an engine measured "
                                      "(--engine hf or vllm) is below this")
    max_regression: float | None = Field(None, gt=0, lt=1, description="fail (exit code 3) when the MAL fell by more "
                                         "than this fraction from the last run (a recipe run with --compare)")

    @model_validator(mode="after")
    def _gates(self) -> SpecConfig:
        if self.min_speedup is not None and getattr(self, "engine", "draftkit") == "draftkit":
            raise ValueError("--min-speedup gates the speedup a serving engine measured: add --engine hf (or vllm); "
                             "draftkit's own loop gives MAL (--min-mal)")
        return self

    @field_validator("k", mode="before")
    @classmethod
    def _k(cls, value):
        """A whole number >= 1 (the command line gives text) or ``dynamic``; one message for both."""
        if value == "dynamic":
            return value
        try:
            k = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            k = None
        if isinstance(value, bool) or k is None or k < 1:
            raise ValueError("must be a whole number >= 1 or 'dynamic'")
        return k


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def read_prompts(path: str, tokenizer, *, chat: bool = True, limit: int | None = None, split: str = "train",
                 column: str | None = None) -> list[str]:
    """Prompt texts from a file or a hub dataset, rendered with ``tokenizer``'s chat template when rows are
    chat-like. A prompt given as a list of turns (MT-Bench) uses its first turn."""
    from draftkit.data import normalise_messages, read_rows, render_chat, row_place

    if not _is_prompt_source(path):
        raise DataError(f"prompts file {path} does not exist")
    rows = read_rows(path, split=split)
    present = set().union(*(r.keys() for r in rows[:100]))
    if column is not None and column not in present:
        raise DataError(f"{path} has no column {column!r}; columns found: {sorted(present)}")
    col = column or next((c for c in PROMPT_COLUMNS if c in present), None)
    if col is None:
        raise DataError(
            f"{path} has no prompt column: found {sorted(present)}; expected one of {', '.join(PROMPT_COLUMNS)}"
        )
    use_chat = chat and col != "text" and bool(getattr(tokenizer, "chat_template", None))
    out = []
    for i, r in enumerate(rows[:limit] if limit else rows):
        value = r.get(col)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            value = value[0]  # multi-turn prompts (MT-Bench): the first turn
        if not value:
            continue
        if isinstance(value, list):
            msgs = normalise_messages(value, row_place(rows, i))
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
            out.append(render_chat(tokenizer, msgs, add_generation_prompt=True) if use_chat
                       else "\n\n".join(m["content"] for m in msgs))
        elif use_chat:
            out.append(render_chat(tokenizer, [{"role": "user", "content": str(value)}], add_generation_prompt=True))
        else:
            out.append(str(value))
    if not out:
        raise DataError(f"{path}: every prompt in column {col!r} is empty")
    return out


def _is_prompt_source(path: str) -> bool:
    """A local file, or a name that can only be a hub dataset (owner/name[:config])."""
    if Path(path).is_file():
        return True
    name = path.partition(":")[0]
    return not Path(path).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~")) \
        and Path(name).suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet", ".txt")


def vocab_mode(draft_tok, target_tok, requested: str) -> str:
    """``same`` when the tokenizers share the vocabulary, else ``text``; raise when neither works."""
    same = draft_tok is not None and target_tok is not None and draft_tok.get_vocab() == target_tok.get_vocab()
    if requested == "same" and not same:
        raise InvalidInputError(
            "the draft's vocabulary differs from the target's, so draft tokens cannot be mapped: use --mode text (or auto)"
        )
    if same and requested != "text":
        return "same"
    if draft_tok is None or target_tok is None:
        raise InvalidInputError("the draft and target vocabularies differ and a tokenizer is missing: no text fallback possible")
    return "text"


def check_text_fallback(draft_tok, texts: list[str]) -> None:
    """Text mode needs the draft's tokenizer to represent the target's text (no unknown tokens)."""
    for text in texts[:8]:
        ids = draft_tok(text, add_special_tokens=False)["input_ids"]
        if draft_tok.decode(ids, skip_special_tokens=False) != text and draft_tok.unk_token_id in ids:
            raise InvalidInputError(
                "the draft's tokenizer cannot represent the target's text (unknown tokens), and the vocabularies "
                "differ: no mapping and no text fallback possible; use a draft that shares the target's tokenizer"
            )


def run_spec(draft: nn.Module, draft_tok, target: nn.Module, target_tok, cfg: SpecConfig) -> dict[str, Any]:
    """Speculative decoding over the prompts file; returns the report."""
    mode = vocab_mode(draft_tok, target_tok, cfg.mode)
    sampling = cfg.temperature > 0
    check_engine(cfg)
    dynamic = cfg.k == "dynamic"
    k = cfg.k_max if dynamic else int(cfg.k)
    controller = TapOut(k) if dynamic else None
    if sampling and mode != "same":
        raise InvalidInputError(
            "--temperature > 0 needs the draft's probabilities over the target's vocabulary: use a draft with the "
            "target's tokenizer, or --temperature 0 (greedy) with --mode text"
        )
    prompts = read_prompts(cfg.prompts, target_tok, chat=cfg.chat, limit=cfg.limit, split=cfg.split, column=cfg.column)
    cap = TextCap(target_tok, model_max_length(target) or 131072, str(cfg.prompts))  # beyond the context: cut as text
    prompts = [cap(p) for p in prompts]
    cap.report()
    if mode == "text":
        check_text_fallback(draft_tok, prompts)
    elif draft.get_output_embeddings().weight.shape[0] < target.get_output_embeddings().weight.shape[0]:
        raise InvalidInputError("the draft's output layer is smaller than the target's vocabulary: use --mode text")
    eos = target_tok.eos_token_id if cfg.stop_at_eos else None
    device = next(target.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if sampling else None
    draft_timer, verify_timer, decode_timer = Timer(), Timer(), Timer()
    steps: list[tuple[int, int]] = []
    committed = draft_forwards = 0
    lossless: list[bool] = []
    spec_seconds = greedy_seconds = 0.0
    context = []
    pairs: list[tuple[list[int], list[int]]] = []  # (target ids, draft ids) of each prompt
    for text in console.track(prompts, f"speculative decoding (k={cfg.k}, {mode} vocabulary)"):
        ids = encode_prompt(target_tok, text)
        pairs.append((ids, ids if mode == "same" else encode_prompt(draft_tok, text)))
        if mode == "same":
            proposer = SameVocabProposer(draft, draft_timer, temperature=cfg.temperature, generator=gen)
        else:
            proposer = TextProposer(draft, draft_timer, draft_tok, target_tok, text, len(ids))
        t0 = time.perf_counter()
        res = speculative_generate(target, proposer, ids, k=k, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                                   timer=verify_timer, temperature=cfg.temperature, generator=gen,
                                   controller=controller)
        spec_seconds += time.perf_counter() - t0
        committed += len(res["tokens"])
        draft_forwards += proposer.forwards
        steps += res["steps"]
        context.append(len(ids) + len(res["tokens"]) / 2)
        if cfg.check_lossless and not sampling:
            t0 = time.perf_counter()
            ref = greedy_generate(target, ids, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos, timer=decode_timer)
            greedy_seconds += time.perf_counter() - t0
            lossless.append(ref == res["tokens"])
    stats = acceptance_stats(steps, k, committed)
    ctx = int(statistics.fmean(context)) if context else 0
    macs_ratio = macs_per_token(draft, ctx) / macs_per_token(target, ctx)
    d_ms, v_ms, t_ms = draft_timer.median_ms(), verify_timer.median_ms(), decode_timer.median_ms()
    report: dict[str, Any] = {
        "mode": mode,
        "k": cfg.k,
        "temperature": cfg.temperature,
        "prompts": len(prompts),
        **stats,
        "draft_forwards": draft_forwards,
        "cost_ratio_macs": macs_ratio,
        "cost_ratio_macs_nonzero": macs_per_token(draft, ctx, nonzero=True) / macs_per_token(target, ctx, nonzero=True),
        "expected_speedup_macs": expected_speedup(stats["mal"], k, macs_ratio),
        # Like against like: one-token decode forwards of each model, prompt prefill excluded on both sides.
        "draft_forward_ms": d_ms,
        "target_forward_ms": t_ms,
        "target_verify_forward_ms": v_ms,
        "cost_ratio_latency": d_ms / t_ms if d_ms and t_ms else None,
        "spec_seconds": spec_seconds,
    }
    if sampling:
        report["seed"] = cfg.seed
    elif cfg.check_lossless:
        report["lossless"] = all(lossless)
        report["lossless_prompts"] = sum(lossless)
        report["target_greedy_seconds"] = greedy_seconds
        report["measured_speedup"] = greedy_seconds / spec_seconds if spec_seconds else None
    if dynamic:
        report.update(k_max=k, tokens_per_target_forward=stats["mal"], **dynamic_summary(controller, steps))
    report["cost_model"] = cost_model(draft, target, pairs, k=k, alpha=stats["acceptance_by_position"],
                                      steps=steps if dynamic else None)
    report.update(engine=cfg.engine, device=describe_device(target), dtype=str(next(target.parameters()).dtype).replace(
        "torch.", ""), repeats=1, speedup=report.get("measured_speedup"))
    if cfg.engine == "hf":
        report.update(run_hf(draft, draft_tok, target, target_tok, [t for t, _ in pairs], k=k,
                             max_new_tokens=cfg.max_new_tokens, eos_token_id=eos, mode=mode, repeats=cfg.repeats))
    elif cfg.engine == "vllm":
        with _model_dir(draft, draft_tok, cfg._draft_dir) as draft_dir:
            report.update(run_vllm(draft_dir, _target_ref(cfg), [t for t, _ in pairs], k=k,
                                   max_new_tokens=cfg.max_new_tokens, stop_at_eos=cfg.stop_at_eos,
                                   repeats=cfg.repeats, dtype=report["dtype"],
                                   trust_remote_code=cfg._trust_remote_code))
    report["predicted_speedup"] = report["cost_model"].get("predicted_speedup")
    report.update(compare(report["speedup"], report["predicted_speedup"]))
    return report


def check_engine(cfg: SpecConfig) -> None:
    """The engine can run these settings (before any weights load)."""
    if cfg.engine == "draftkit":
        return
    if cfg.k == "dynamic":
        raise InvalidInputError(f"--k dynamic runs in draftkit's loop only: use --engine draftkit, or an integer "
                                f"--k with --engine {cfg.engine}")
    if cfg.temperature > 0:
        raise InvalidInputError(f"--engine {cfg.engine} measures greedy decoding: use --temperature 0, or --engine draftkit")
    if cfg.engine == "vllm":
        check_vllm()


def _target_ref(cfg: SpecConfig) -> str:
    from draftkit.refs import resolve_model_ref

    return resolve_model_ref(cfg.target).location  # a folder, a .gguf file (vLLM reads GGUF) or a hub id


@contextmanager
def _model_dir(model: nn.Module, tokenizer, saved: str | None) -> Iterator[str]:
    """A folder vLLM can load the draft from: ``saved``, the folder the stage read it from (or that a recipe's
    earlier stage wrote it to), else a temporary copy, removed afterwards. Never ``model.name_or_path``: a model
    pruned or distilled in memory still names its source folder there."""
    import tempfile

    from draftkit.refs import resolve_model_ref

    folder = Path(resolve_model_ref(saved).location) if saved else None
    if folder is not None and folder.is_dir() and (folder / "config.json").is_file():
        yield str(folder)
        return
    with tempfile.TemporaryDirectory(prefix="draftkit-vllm-draft-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        yield tmp


def check_spec(hf_config, cfg: SpecConfig) -> None:
    """Before any weights load: the prompts file exists and the target reference resolves."""
    from draftkit.refs import resolve_model_ref

    if not _is_prompt_source(cfg.prompts):
        raise DataError(f"prompts file {cfg.prompts} does not exist")
    resolve_model_ref(cfg.target)
    check_engine(cfg)


def spec_stage(model, tokenizer, cfg: SpecConfig):
    """Stage function: the loaded model is the draft; the target is loaded from ``cfg.target``."""
    from draftkit.checkpoint import load_model_and_tokenizer
    from draftkit.compute import load_dtype

    # fail on a bad prompts file before the target loads
    read_prompts(cfg.prompts, tokenizer, chat=False, limit=1, split=cfg.split, column=cfg.column)
    device = str(next(model.parameters()).device)
    from draftkit.compute import current_dtype
    from draftkit.memory_stages import announce, spec_estimate

    estimate = announce(spec_estimate(model, cfg.target, compute=current_dtype(), trust_remote_code=cfg._trust_remote_code),
                        "draft and target in memory")
    # the target's greedy reference and its verification of the draft both run in this one compute dtype
    target, target_tok = load_model_and_tokenizer(cfg.target, dtype=load_dtype() or "auto", device=device,
                                                  trust_remote_code=cfg._trust_remote_code)
    return model, {**run_spec(model, tokenizer, target, target_tok, cfg), "memory_estimate_gb": estimate}
