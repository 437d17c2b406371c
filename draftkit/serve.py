"""Can this draft be served next to its target, and how: vLLM, SGLang or transformers.

:func:`check_serving` compares a draft checkpoint folder with its target for one engine:

* **vocabulary**: identical tokenizers (same token -> id map), else the overlap; vLLM's ``draft_model``
  method and SGLang's ``STANDALONE`` algorithm need the same vocabulary (vLLM has a heterogeneous-vocabulary
  mode with greedy drafting only); transformers runs any pair (``assistant_tokenizer``, Universal Assisted
  Generation);
* **special tokens**: the target's EOS / end-of-turn tokens must exist in the draft with the same ids;
* **architecture**: the draft's ``architectures[0]`` must be one the engine implements;
* **sparsity_config**: no compressed-tensors ``sparsity_config`` in what is served (vLLM >= 0.19 refuses such
  checkpoints and never loaded unstructured sparse-bitmask; transformers 5 fails on it): a sparse export is
  an archival/transport format that ``draftkit decompress`` turns back into a servable dense checkpoint.

It returns a report with ``status`` (``ready``, ``needs_heterogeneous_vocab`` or ``cannot_run``), the
reason, every check, and the exact invocation; :func:`write_serving` also writes ``serve-ENGINE.json`` and
``SERVE-ENGINE.md`` into the draft's folder.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Literal

from draftkit.atomic import atomic_write_json, atomic_write_text

Engine = Literal["vllm", "sglang", "hf"]
ENGINES: tuple[str, ...] = ("vllm", "sglang", "hf")

# Decoder architectures each engine implements (checked against the engine's own registry when it is
# installed; this list is the fallback). Common draft/target families only.
_COMMON = {
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GemmaForCausalLM",
    "Phi3ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "OPTForCausalLM", "Olmo2ForCausalLM",
    "GraniteForCausalLM", "StableLmForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM",
}
KNOWN_ARCHITECTURES = {"vllm": _COMMON, "sglang": _COMMON - {"OPTForCausalLM", "GPTNeoXForCausalLM"}}
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def _engine_architectures(engine: str) -> set[str]:
    if engine == "hf":
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    try:  # the engine's own registry when it is installed
        if engine == "vllm":
            from vllm import ModelRegistry  # type: ignore[import-not-found]

            return set(ModelRegistry.get_supported_archs())
    except Exception:  # noqa: BLE001 - not installed (the usual case on a CPU machine)
        pass
    return set(KNOWN_ARCHITECTURES[engine])


def _eos_ids(config: dict[str, Any], folder: Path | None) -> set[int]:
    ids: set[int] = set()
    sources = [config]
    if folder is not None and (folder / "generation_config.json").is_file():
        sources.append(json.loads((folder / "generation_config.json").read_text()))
    for src in sources:
        v = src.get("eos_token_id")
        ids.update(v if isinstance(v, list) else [v] if isinstance(v, int) else [])
    return ids


def _read_config(name: str, trust_remote_code: bool = False) -> tuple[dict[str, Any], Path | None]:
    from draftkit.checkpoint import load_config, resolve_model_ref

    ref = resolve_model_ref(name)
    if ref.local:
        return json.loads((Path(ref.location) / "config.json").read_text()), Path(ref.location)
    return load_config(name, trust_remote_code=trust_remote_code).to_dict(), None


def check_serving(draft: str | Path, target: str, engine: str, *, k: int = 4, draft_tokenizer=None,
                  target_tokenizer=None, served_as: str | Path | None = None,
                  trust_remote_code: bool = False) -> dict[str, Any]:
    """Check ``draft`` (a checkpoint folder) against ``target`` for ``engine``; see the module docstring.

    ``served_as`` is the path written into the invocation (default: ``draft`` itself, absolute).
    """
    from draftkit.checkpoint import load_tokenizer
    from draftkit.errors import InvalidInputError

    if engine not in ENGINES:
        raise InvalidInputError(f"unknown serving engine {engine!r}: use one of {', '.join(ENGINES)}")
    draft = Path(draft)
    d_cfg = json.loads((draft / "config.json").read_text())
    t_cfg, t_dir = _read_config(target, trust_remote_code)
    d_tok = draft_tokenizer or load_tokenizer(str(draft))
    t_tok = target_tokenizer or load_tokenizer(target, trust_remote_code=trust_remote_code)
    checks: list[dict[str, Any]] = []

    def add(name: str, level: str, detail: str) -> None:
        checks.append({"check": name, "level": level, "detail": detail})

    # vocabulary
    dv, tv = d_tok.get_vocab(), t_tok.get_vocab()
    same_vocab = dv == tv
    shared = len(set(dv.items()) & set(tv.items()))
    overlap = round(shared / max(1, len(tv)), 4)
    rows_d, rows_t = d_cfg.get("vocab_size"), t_cfg.get("vocab_size")
    if same_vocab:
        add("vocabulary", "ok", f"identical tokenizers ({len(tv)} tokens)")
    else:
        level = "ok" if engine == "hf" else "error"
        add("vocabulary", level, f"different tokenizers: {shared} of the target's {len(tv)} tokens map to the same id "
                                 f"in the draft (overlap {overlap:.1%})")
    if same_vocab and rows_d != rows_t and engine != "hf":
        add("embedding rows", "warning", f"vocab_size differs (draft {rows_d}, target {rows_t}): "
                                         f"{engine} may refuse the pair; pad the draft's embeddings to {rows_t}")
    # special tokens
    t_eos = {t_tok.convert_ids_to_tokens(i) for i in _eos_ids(t_cfg, t_dir) if 0 <= i < len(t_tok)}
    if t_tok.eos_token:
        t_eos.add(t_tok.eos_token)
    t_eos |= {tok for tok in END_OF_TURN if tok in tv and tok in (t_tok.all_special_tokens or [])}
    missing = sorted(t for t in t_eos if t is not None and dv.get(t) != tv.get(t))
    if missing:
        add("special tokens", "warning", f"the target's end tokens {missing} are missing from the draft or have other ids: "
                                         "the draft drafts past the end of a turn (still lossless, fewer tokens accepted)")
    else:
        add("special tokens", "ok", f"EOS / end-of-turn {sorted(t for t in t_eos if t)} have the same ids in both")
    # architecture
    arch = (d_cfg.get("architectures") or ["?"])[0]
    known = _engine_architectures(engine)
    add("architecture", "ok" if arch in known else "error",
        f"{arch} is {'' if arch in known else 'not '}an architecture {engine} implements")
    # sparsity_config
    sparse = bool((d_cfg.get("quantization_config") or {}).get("sparsity_config"))
    if sparse:
        add("sparsity_config", "error", "the draft is draftkit's sparse-bitmask archive (compressed-tensors 0.14 layout): "
            "vLLM >= 0.19 refuses a config with a sparsity_config, no engine loads unstructured bitmask, transformers 5 "
            f"fails on it; serve its dense form: draftkit decompress {draft} -o {draft}-dense")
    else:
        add("sparsity_config", "ok", "dense safetensors, no sparsity_config")

    errors = [c for c in checks if c["level"] == "error"]
    vocab_only = errors and all(c["check"] == "vocabulary" for c in errors)
    if not errors:
        status, reason = "ready", f"the pair runs on {engine} as written"
    elif vocab_only and engine == "vllm":
        status = "needs_heterogeneous_vocab"
        reason = ("different vocabularies: vLLM's draft_model method needs the target's tokenizer; only its "
                  "heterogeneous-vocabulary mode (greedy drafting only) runs this pair (see vLLM's speculative decoding "
                  "docs); transformers runs it with assistant_tokenizer")
    else:
        status = "cannot_run"
        reason = "; ".join(c["detail"] for c in errors)
    served = Path(served_as) if served_as is not None else draft
    if sparse:
        served = served.with_name(served.name + "-dense")
    return {"engine": engine, "draft": str(draft), "target": target, "k": k, "status": status, "reason": reason,
            "same_vocabulary": same_vocab, "vocab_overlap": overlap, "checks": checks,
            "invocation": invocation(engine, str(served.resolve()), target, k, same_vocab)}


def invocation(engine: str, draft: str, target: str, k: int, same_vocab: bool) -> dict[str, str]:
    """The exact command / code that serves ``draft`` for ``target`` on ``engine``."""
    if engine == "vllm":
        spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": k}
        spec_json = json.dumps(spec)
        return {
            "speculative_config": spec_json,
            "shell": f"vllm serve {shlex.quote(target)} --speculative-config {shlex.quote(spec_json)}",
            "python": f"from vllm import LLM\nllm = LLM(model={target!r}, speculative_config={spec!r})",
        }
    if engine == "sglang":
        return {"shell": " ".join([
            "python -m sglang.launch_server", "--model-path", shlex.quote(target),
            "--speculative-algorithm STANDALONE", "--speculative-draft-model-path", shlex.quote(draft),
            f"--speculative-num-steps {k}", "--speculative-eagle-topk 1", f"--speculative-num-draft-tokens {k + 1}"])}
    lines = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tokenizer = AutoTokenizer.from_pretrained({target!r})",
        f"target = AutoModelForCausalLM.from_pretrained({target!r})",
        f"draft = AutoModelForCausalLM.from_pretrained({draft!r})",
        'inputs = tokenizer("Hello", return_tensors="pt")',
    ]
    if same_vocab:
        lines.append(f"out = target.generate(**inputs, assistant_model=draft, num_assistant_tokens={k}, max_new_tokens=128)")
    else:  # Universal Assisted Generation: the draft's tokens go back through text
        lines += [f"draft_tokenizer = AutoTokenizer.from_pretrained({draft!r})",
                  "out = target.generate(**inputs, assistant_model=draft, tokenizer=tokenizer, "
                  f"assistant_tokenizer=draft_tokenizer, num_assistant_tokens={k}, max_new_tokens=128)"]
    return {"python": "\n".join(lines)}


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Serving this draft with {report['engine']}", "",
             f"- target: `{report['target']}`", f"- status: **{report['status']}** — {report['reason']}", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['level']} | {c['detail'].replace('|', '/')} |" for c in report["checks"]]
    for kind, text in report["invocation"].items():
        lang = "bash" if kind == "shell" else "python" if kind == "python" else "json"
        lines += ["", f"{kind}:", "", f"```{lang}", text, "```"]
    return "\n".join(lines) + "\n"


def write_serving(folder: str | Path, report: dict[str, Any]) -> None:
    """``serve-ENGINE.json`` and ``SERVE-ENGINE.md`` beside the draft's weights."""
    folder = Path(folder)
    atomic_write_json(folder / f"serve-{report['engine']}.json", report)
    atomic_write_text(folder / f"SERVE-{report['engine']}.md", to_markdown(report))
