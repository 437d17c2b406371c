"""FSDP2 training with the sparsity masks held on sharded weights: 2 CPU processes (torchrun, gloo).

accelerate (1.15) routes FSDP on GPUs only: ``accelerate launch --use_fsdp`` on a machine without a GPU, or
with ``--cpu``, trains with DDP instead (``commands/launch.py`` picks its multi-GPU launcher only without
``--cpu``; ``AcceleratorState`` switches to ``DistributedType.FSDP`` only from a multi-GPU-like type, never
from ``MULTI_CPU``), so a test through the accelerate-config route would pass here with the sharded-mask code
deleted. This test therefore drives ``torch.distributed.fsdp.fully_shard`` directly: ``fsdp`` (``--fsdp``) has
draftkit's :func:`~draftkit.distill.fsdp.shard_for_fsdp` make the units accelerate's FSDP2 plugin makes, then the
same ``train_sequences`` loop, mask hold and gather run as under an FSDP accelerate config on GPUs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from draftkit.distill.config import DistillConfig
from draftkit.distill.train import IGNORE, train_sequences
from draftkit.sparsify.masks import target_linears
from tests._helpers_distill import sft_file
from tests.test_distill_cli import invoke, one_line_error
from tests.test_distill_multiprocess import _free_port

FIXTURES = (sft_file,)

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(dataset="unused.jsonl", regenerate=False, lr=1e-3, lr_schedule="constant", warmup=0.0, weight_decay=0.1,
           eval_fraction=0.0, max_steps=3, checkpoints=False, seed=0)


def _sequences(n: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Random token rows of different lengths; the first 4 tokens of each are prompt (no loss)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(10, 24, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * 4 + ids[4:]})
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_fsdp_two_processes_hold_masks_on_shards_and_match_one_process(tiny_llama, tmp_path, tied):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    if tied:  # as SmolLM2 and Llama-3.2: one weight in two places, gathered once and tied again
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin in target_linears(model).values():  # 50% sparse
            lin.weight.mul_(torch.rand(lin.weight.shape, generator=g) >= 0.5)
    student = tmp_path / "student"
    model.save_pretrained(student)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep = {f"{n}.weight": lin.weight != 0 for n, lin in target_linears(model).items()}
    data = tmp_path / "data.json"
    data.write_text(json.dumps(_sequences(8, model.config.vocab_size)))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**CFG, "train_batch_size": 2, "fsdp": True}))
    out = tmp_path / "out"
    out.mkdir()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DRAFTKIT_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "_fsdp_worker.py"), str(student), str(data), str(config), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]

    # (a) on every rank's shard, every position that was zero is still exactly zero when training ends
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert set(ranks[0]) == set(ranks[1]) and len(ranks[0]) == len(keep)
    for name in ranks[0]:
        assert ranks[0][name]["rows"] + ranks[1][name]["rows"] == keep[f"{name}.weight"].shape[0]  # really sharded
        for check in (ranks[0][name], ranks[1][name]):
            assert check["zeros"] > 0 and check["zeros_kept"] == check["zeros"], (name, check)
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == CFG["max_steps"]
    assert report["masked_modules"] == len(keep) and report["zero_positions_changed"] == 0
    assert report["class"] == "LlamaForCausalLM" and report["tied"] == tied  # a plain model, gathered from the shards

    # (b) the kept weights did train; the gathered weights hold the same zeros
    two = load_file(out / "model.safetensors")
    moved = sum(int(((two[n] != before[n]) & k).sum()) for n, k in keep.items())
    assert moved > 0.9 * sum(int(k.sum()) for k in keep.values())
    for n, k in keep.items():
        assert torch.equal(two[n] != 0, k), n

    # (c) the same weights as one process with the same global batch (2 x 2 rows a step there, 4 here)
    one, one_report = train_sequences(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
                                      json.loads(data.read_text()), 0, DistillConfig(**{**CFG, "train_batch_size": 4}))
    assert one_report["processes"] == 1
    one_state = one.state_dict()
    assert set(two) == set(one_state)
    for name, w in one_state.items():
        assert torch.allclose(two[name], w, atol=2e-5), (name, float((two[name] - w).abs().max()))


def test_fsdp_bad_settings_are_one_line(tiny_llama, sft_file, tmp_path):
    r = invoke("distill", "train", tiny_llama, "--dataset", sft_file, "-o", tmp_path / "o", "--fsdp", "--lora-rank", "4")
    one_line_error(r, 2, "fsdp", "lora_rank")
    r = invoke("distill", "train", tiny_llama, "--dataset", sft_file, "-o", tmp_path / "o", "--fsdp", "--max-steps", "1")
    one_line_error(r, 2, "--fsdp shards the student over several processes", "torchrun")
    assert not (tmp_path / "o").exists()
