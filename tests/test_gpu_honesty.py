"""What the code does on a GPU, pinned without one (no GPU has run this code): a mocked ``torch.cuda``, a fake
CUDA device, and the placement decisions compared between the resident and streamed paths."""

import sys

import pytest
import torch

from draftkit.data import CalibConfig
from draftkit.prune import PruneConfig


def test_timed_forward_reads_the_clock_after_cuda_synchronize(monkeypatch):
    """CUDA kernels run asynchronously: a clock read right after the call times their launch only."""
    from types import SimpleNamespace

    from draftkit.evaluate import proposers

    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"sync {device}"))
    clock = iter(range(100))
    monkeypatch.setattr(proposers.time, "perf_counter", lambda: events.append("clock") or next(clock))
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda data, device=None, **kw: real_tensor(data, **kw))  # no CUDA here

    class FakeCudaModel:
        def parameters(self):
            yield SimpleNamespace(device=torch.device("cuda", 1))

        def __call__(self, **kw):
            events.append("forward")
            return SimpleNamespace(logits=torch.zeros(1, 2, 5))

    timer = proposers.Timer()
    proposers.forward(FakeCudaModel(), [1, 2], None, timer)
    assert events == ["sync cuda:1", "clock", "forward", "sync cuda:1", "clock"]
    assert timer.times == [1]


def test_auto_chunk_budget_is_the_gpus_free_memory(tiny_llama, monkeypatch):
    from draftkit.checkpoint import load_config
    from draftkit.sparsify.calib import _auto_chunk_tokens

    config = load_config(str(tiny_llama))
    asked = []

    def mem_get_info(device=None):
        asked.append(device)
        return 2**24, 80 * 2**30  # 16 MiB free of 80 GiB: fewer tokens than the default chunk

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    gpu = _auto_chunk_tokens(config, 64, torch.device("cuda", 0))
    cpu = _auto_chunk_tokens(config, 64, torch.device("cpu"))
    per_token = 4 * (10 * 64 + 3 * 128 + 2 * 4 * 64)
    assert asked == [torch.device("cuda", 0)] and gpu == int(2**24 * 0.25 / per_token)
    assert cpu != gpu  # the host's RAM is another budget


def test_resident_and_streamed_place_activations_by_the_same_decision(tiny_llama, calib_file, tmp_path, monkeypatch):
    from draftkit import memory
    from draftkit.engine import layers as layerwise
    from draftkit.stages import LoadConfig, run_stage

    seen = {}
    for cls in (layerwise.ResidentLayers, layerwise.StreamedLayers):
        real_load = cls.load

        def load(self, i, real_load=real_load):
            seen[type(self).__name__] = self.store
            return real_load(self, i)

        monkeypatch.setattr(cls, "load", load)
    decided = []
    real = memory.activation_device

    def activation_device(est, device):
        decided.append(real(est, device))
        return decided[-1]

    monkeypatch.setattr(memory, "activation_device", activation_device)
    monkeypatch.setattr("draftkit.engine.placement.activation_device", activation_device)
    cfg = PruneConfig(layers=2, calib=CalibConfig(path=str(calib_file), samples=4, seqlen=32))
    for mode in ("off", "on"):
        run_stage("prune", str(tiny_llama), cfg, out=tmp_path / mode, load=LoadConfig(stream=mode))
    assert decided == [torch.device("cpu")] * 2
    assert seen == {"ResidentLayers": torch.device("cpu"), "StreamedLayers": torch.device("cpu")}


def test_training_pins_the_asked_gpu_for_accelerate(monkeypatch):
    """accelerate trains one process on ``cuda``, the current GPU: --device cuda:1 must make it cuda:1."""
    from draftkit.distill.prepare import pin_accelerator_device

    pinned = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pinned.append(d))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    pin_accelerator_device(torch.device("cuda", 1))
    pin_accelerator_device(torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: each process's GPU is its local rank's
    pin_accelerator_device(torch.device("cuda", 1))
    assert pinned == [torch.device("cuda", 1)]


def test_training_pins_the_students_device_before_accelerate(tiny_llama, tmp_path, monkeypatch):
    import json

    from draftkit.checkpoint import load_model_and_tokenizer
    from draftkit.distill import DistillConfig, distill_model
    from draftkit.distill import train as train_mod

    order = []
    monkeypatch.setattr(train_mod, "pin_accelerator_device", lambda d: order.append(("pin", d)))
    import accelerate

    real = accelerate.Accelerator
    monkeypatch.setattr(accelerate, "Accelerator", lambda *a, **k: order.append(("accelerator",)) or real(*a, **k))
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}?", "response": f"{i}."}) + "\n" for i in range(4)))
    model, tok = load_model_and_tokenizer(str(tiny_llama), dtype="float32", device="cpu")
    cfg = DistillConfig(dataset=str(rows), regenerate=False, train_batch_size=2, max_steps=1, eval_fraction=0.0,
                        checkpoints=False)
    distill_model(model, tok, cfg)
    assert order[:2] == [("pin", torch.device("cpu")), ("accelerator",)]


@pytest.mark.parametrize(("command", "setting"), [("prune", "--batch-size"), ("sparsify", "--chunk-tokens"),
                                                   ("distill", "--train-batch-size"), ("run", "recipe")])
def test_cuda_out_of_memory_is_one_line_from_main(command, setting, monkeypatch, capsys):
    """Raised inside any command, a CUDA OOM is told once, in main(): one line naming what to lower, exit 2."""
    import draftkit.cli as cli
    from draftkit.cli._common import handle_errors

    def fails():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fails.__module__ = f"draftkit.cli.{command}"
    monkeypatch.setattr(cli, "app", handle_errors(fails))
    monkeypatch.setattr(sys, "argv", ["draftkit"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: the GPU ran out of memory") and setting in err[0] and "internal error" not in err[0]
