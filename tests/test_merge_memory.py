"""A merge is streamed: peak RSS does not grow with the checkpoints. Two merges run in fresh
interpreters that report their own VmHWM (peak resident set): of two tiny models, and of two larger
random checkpoints; the difference must stay far below one checkpoint's size (whole tensors or whole
models resident would show it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Runs `draftkit ARGS` and writes the interpreter's VmHWM (kB) to DK_PEAK_FILE at exit (as benchmarks/scale.py).
_LAUNCH = (
    "import atexit, os, runpy, sys\n"
    "def _peak():\n"
    "    with open('/proc/self/status') as f:\n"
    "        hwm = next(l for l in f if l.startswith('VmHWM'))\n"
    "    open(os.environ['DK_PEAK_FILE'], 'w').write(hwm.split()[1])\n"
    "atexit.register(_peak)\n"
    "sys.argv = ['draftkit', *sys.argv[1:]]\n"
    "runpy.run_module('draftkit', run_name='__main__')\n"
)


def random_checkpoint(out: Path, tokenizer_dir: Path, *, hidden: int, inter: int, vocab: int, layers: int,
                      seed: int, dtype=torch.float32) -> int:
    """A random Llama checkpoint written tensor by tensor (tied embeddings); returns its size in bytes."""
    from transformers import LlamaConfig

    from draftkit.checkpoint import empty_model
    from draftkit.checkpoint.stream import ShardWriter

    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, vocab_size=vocab, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.dtype = dtype
    out.mkdir(parents=True)
    plan = [(k, tuple(v.shape), dtype) for k, v in empty_model(config).state_dict().items() if k != "lm_head.weight"]
    writer = ShardWriter(out, plan, max_shard_bytes=2**30)
    g = torch.Generator().manual_seed(seed)
    for name, shape, dt in plan:
        writer.write({name: torch.ones(shape, dtype=dt) if name.endswith("norm.weight")
                      else (torch.randn(shape, generator=g) * 0.02).to(dt)})
    writer.close()
    config.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return writer.total_size


def peak_mb(args: list[str], tmp: Path) -> float:
    peak = tmp / "peak"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DRAFTKIT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "DK_PEAK_FILE": str(peak)}
    r = subprocess.run([sys.executable, "-c", _LAUNCH, *args, "-q"], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    return int(peak.read_text()) / 1024


def _peaks(tmp_path: Path, tokenizer_dir: Path, **shape) -> tuple[float, float, int]:
    small = [random_checkpoint(tmp_path / f"s{i}", tokenizer_dir, hidden=64, inter=128, vocab=512, layers=2,
                               seed=i) for i in range(2)]
    assert small
    size = random_checkpoint(tmp_path / "a", tokenizer_dir, seed=0, **shape)
    random_checkpoint(tmp_path / "b", tokenizer_dir, seed=1, **shape)
    p_small = peak_mb(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(tmp_path / "ms")], tmp_path)
    p_large = peak_mb(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "ml")], tmp_path)
    return p_small, p_large, size


def test_merge_memory_does_not_grow_with_the_checkpoint(tiny_tokenizer_dir, tmp_path):
    # 2 x 166 MB of float32 inputs (the embedding alone is 131 MB), 166 MB written
    p_small, p_large, size = _peaks(tmp_path, tiny_tokenizer_dir, hidden=1024, inter=2816, vocab=32000, layers=1)
    assert size > 160 * 2**20
    assert p_large - p_small < 100, (p_small, p_large, size / 2**20)


@pytest.mark.slow
def test_merge_of_two_1b_wide_checkpoints_stays_within_a_few_hundred_mb(tiny_tokenizer_dir, tmp_path):
    """Llama-3.2-1B's width (hidden 2048, MLP 8192, vocab 128256: a 525 MB bfloat16 embedding), 2 layers."""
    p_small, p_large, size = _peaks(tmp_path, tiny_tokenizer_dir, hidden=2048, inter=8192, vocab=128256, layers=2,
                                    dtype=torch.bfloat16)
    assert size > 700 * 2**20
    assert p_large - p_small < 200, (p_small, p_large, size / 2**20)
