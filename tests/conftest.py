"""Session fixtures: a tiny byte-level tokenizer with a chat template, tiny random models of several
architectures built from transformers config classes, and a small calibration file."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DRAFTKIT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models run faster on one thread (and CI machines may be shared); DRAFTKIT_THREADS keeps the
# stages (which apply draftkit's thread default) on it too.
os.environ.setdefault("DRAFTKIT_THREADS", "1")
torch.set_num_threads(1)

_QUIETED_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                "DATASETS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")
_QUIETED_LOGGERS = ("transformers", "datasets", "huggingface_hub", "accelerate")


def transformers_bars() -> bool | None:
    """Whether transformers shows its progress bars (None: not imported, so never silenced)."""
    import sys

    return sys.modules["transformers"].utils.logging.is_progress_bar_enabled() if "transformers" in sys.modules else None


@pytest.fixture(autouse=True)
def _console_state():
    """The CLI sets draftkit's console flags per invocation (--quiet, and without --verbose silences libraries
    process-wide: environment variables, warning filters, logger levels); a test after another test's in-process
    CLI call must not inherit them."""
    import logging
    import warnings

    from draftkit import console

    env = {name: os.environ.get(name) for name in _QUIETED_ENV}
    loggers = {name: (logging.getLogger(name).level, list(logging.getLogger(name).filters))
               for name in (*_QUIETED_LOGGERS, *(n for n, _ in console.HARMLESS_RECORDS))}
    verbose = console.verbose()
    bars = transformers_bars()
    with warnings.catch_warnings():  # warning filters restored
        yield
    console.set_quiet(False)
    console._verbose = verbose
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if bars and not transformers_bars():
        import transformers

        transformers.utils.logging.enable_progress_bar()
    for name, (level, kept) in loggers.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).filters[:] = kept


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

NAMES = ["Tom", "Ana", "Lee", "Mia", "Sam", "Ivy"]
THINGS = ["apples", "pens", "cards", "books", "coins"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(2, 40), rng.randint(1, 30)
        q = f"{name} has {a} {thing}. {name} buys {b} more {thing}. How many {thing} does {name} have now?"
        ans = f"{name} starts with {a} {thing}. {a} + {b} = {a + b}.\n#### {a + b}"
        rows.append({"question": q, "answer": ans})
    return rows


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = [r["question"] + "\n" + r["answer"] for r in make_rows(300)]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def tiny_config(arch: str, vocab_size: int, layers: int = 6):
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=16, max_window_layers=3)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=32)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    if arch == "phi3":
        return tf.Phi3Config(**common, original_max_position_embeddings=256)
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "mistral", "gemma2", "phi3"]
MOE_ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


def tiny_moe_config(arch: str, vocab_size: int, layers: int = 4, experts: int = 8, top_k: int = 2):
    """A tiny random MoE config: 8 routed experts of width 32, 2 per token (Qwen2-MoE adds its shared expert)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, num_experts_per_tok=top_k,
    )
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32, num_experts=experts,
                                 head_dim=16, norm_topk_prob=True)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32, num_experts=experts,
                                 shared_expert_intermediate_size=48)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=32, num_local_experts=experts)
    if arch == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=32, num_experts=experts)
    raise ValueError(arch)


def make_tiny_moe(arch: str, tokenizer_dir: Path, out: Path, layers: int = 4, seed: int = 0) -> Path:
    """A saved tiny random MoE model (float32) with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(arch, len(tok), layers))
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_moe_models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """One saved tiny random MoE model per architecture (4 layers, 8 experts, top-2)."""
    root = tmp_path_factory.mktemp("moe")
    return {arch: make_tiny_moe(arch, tiny_tokenizer_dir, root / arch) for arch in MOE_ARCHS}


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


def make_tiny_model(arch: str, tokenizer_dir: Path, out: Path, layers: int = 6, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), layers))
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_tied_llama(tokenizer_dir: Path, out: Path, layers: int) -> Path:
    """A tiny Llama with a tied head, stored once under the embeddings' key (as SmolLM2 and Llama-3.2-1B are)."""
    from safetensors.torch import load_file, save_file

    make_tiny_model("llama", tokenizer_dir, out, layers=layers)
    cfg = json.loads((out / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    w = load_file(out / "model.safetensors")
    w.pop("lm_head.weight")
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """One saved tiny random model per architecture (6 layers, hidden 64)."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(arch, tiny_tokenizer_dir, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(64, seed=1)))
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama as a GGUF file (F32 tensors, its tokenizer and chat template), written with ``gguf``."""
    from tests._helpers_gguf import write_tiny_gguf

    return write_tiny_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
