"""Memory of the layer-wise stages: scoring keeps no layer's hidden states past the next layer, and the printed
estimate covers what the run holds."""

import weakref

import torch

from draftkit.checkpoint import load_model_and_tokenizer
from draftkit.data import CalibConfig, calibration_samples
from draftkit.engine import forward
from draftkit.prune import runner


def test_prune_scoring_frees_each_layers_hidden_states(tiny_llama, calib_file, monkeypatch):
    """Only the last token's states of each layer are kept: a float32 CPU ``.float().cpu()`` of a slice is a view
    that would keep every token's states of every layer alive (RSS growing by one layer's states per layer)."""
    model, tok = load_model_and_tokenizer(str(tiny_llama), dtype="float32", device="cpu")
    samples = calibration_samples(tok, CalibConfig(path=str(calib_file), samples=4, seqlen=32))
    outputs: list[list[weakref.ref]] = []
    real = forward.run_layer  # the engine's layer forward, which scoring runs through

    def tracked(layer, hidden, args):
        out = real(layer, hidden, args)
        index = next(i for i, m in enumerate(runner.decoder_layers(model)) if m is layer)
        while len(outputs) <= index:
            outputs.append([])
        outputs[index].append(weakref.ref(out))
        if index >= 3:  # three layers on (a loop variable may still hold the one before), layer index-3 is garbage
            assert all(r() is None for r in outputs[index - 3]), f"layer {index - 3}'s hidden states are still alive"
        return out

    monkeypatch.setattr(forward, "run_layer", tracked)
    states, bi = runner.collect_layer_states(model, samples, batch_size=2)
    assert len(outputs) == 6 and states.shape == (4, 7, model.config.hidden_size) and states.dtype == torch.float32
    # the kept states are the last token's, whatever the storage
    assert states.untyped_storage().nbytes() == states.numel() * 4


def test_eager_attention_scores_are_estimated_only_for_eager(tiny_llama):
    """sdpa (the default) never holds the [heads, seq, seq] scores; eager does, and the estimate says so."""
    from draftkit.checkpoint import load_config
    from draftkit.memory import estimate_memory

    config = load_config(str(tiny_llama))
    kw = dict(ckpt_bytes=10**6, streamed=False, device=torch.device("cpu"), tokens=4096, seqlen=512, chunk_tokens=2048,
              sparsegpt=False)
    sdpa = estimate_memory(config, **kw).parts["layer_forward"]
    config._attn_implementation = "eager"
    eager = estimate_memory(config, **kw).parts["layer_forward"]
    heads = config.num_attention_heads
    assert eager - sdpa == 2048 * 4 * 2 * heads * 512


def test_distill_prints_and_reports_its_estimate(tiny_llama, tmp_path, capsys):
    import json

    from draftkit.distill import DistillConfig, load_examples, train_model
    from draftkit.distill.estimate import estimate_training

    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "response": f"It is {i + 1}."}) + "\n"
                            for i in range(8)))
    cfg = DistillConfig(dataset=str(rows), regenerate=False, train_batch_size=4, max_steps=1, eval_fraction=0.0,
                        checkpoints=False)
    model, tok = load_model_and_tokenizer(str(tiny_llama), dtype="float32", device="cpu")
    params = sum(p.numel() for p in model.parameters())
    _, report = train_model(model, tok, load_examples(cfg), cfg)
    est = report["memory_estimate_gb"]
    line = next(x for x in capsys.readouterr().err.splitlines() if "memory estimate" in x)
    assert line.startswith(f"memory estimate: host {est['host']:.2f} GB") and line.endswith("; training")
    assert est["weights"] == round(params * 4 / 1e9, 3) and est["optimizer"] == round(2 * params * 4 / 1e9, 3)
    # the switches that save memory lower the estimate by what they save
    kw = dict(tokens=4 * 64, seqlen=64, precision="fp32", loss_chunk=512)
    full = estimate_training(model, checkpointing=False, optimizer_in_backward=False, **kw)
    oib = estimate_training(model, checkpointing=False, optimizer_in_backward=True, **kw)
    ckpt = estimate_training(model, checkpointing=True, optimizer_in_backward=False, **kw)
    assert full.host - oib.host == params * 4
    assert ckpt.parts["activations"] < full.parts["activations"] / 2
