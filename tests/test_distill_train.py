"""Training: response-only labels and loss, loss goes down, sparsity masks held exactly (full and LoRA),
epoch checkpoints resume."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from draftkit.distill import DistillConfig, load_examples, train_model
from draftkit.distill import train as train_mod
from draftkit.distill.train import IGNORE, collate, response_loss, tokenize_example
from draftkit.sparsify.masks import extract_masks, target_linears
from tests._helpers_distill import no_template_model, one_thread, sft_file

FIXTURES = (no_template_model, one_thread, sft_file)  # pytest finds fixtures by name in this module
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(sft_file, **kw):
    base = dict(dataset=str(sft_file), regenerate=False, lr=3e-3, train_batch_size=4, eval_fraction=0.2, warmup=0.0,
                lr_schedule="constant", checkpoints=False)
    return DistillConfig(**{**base, **kw})


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_labels_cover_exactly_the_response(tiny_llama, no_template_model):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = [{"role": "user", "content": "Tom has 3 pens. How many?"}]
    enc = tokenize_example(tok, prompt, "3 pens.\n#### 3", 256)
    n_prompt = sum(1 for x in enc["labels"] if x == IGNORE)
    assert tok.decode(enc["input_ids"][:n_prompt]) == "<|user|>\nTom has 3 pens. How many?</s>\n<|assistant|>\n"
    assert enc["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert tok.decode(enc["labels"][n_prompt:]) == "3 pens.\n#### 3</s>\n"  # the end of turn is learnt too
    cut = tokenize_example(tok, prompt, "3 pens.\n#### 3", n_prompt + 2)
    assert len(cut["input_ids"]) == n_prompt + 2 == len(cut["labels"])

    plain = AutoTokenizer.from_pretrained(no_template_model)  # fallback: "User: ...\n\nAssistant: " + response + EOS
    enc = tokenize_example(plain, prompt, "3", 256)
    n_prompt = enc["labels"].count(IGNORE)
    assert plain.decode(enc["input_ids"][:n_prompt]).endswith("User: Tom has 3 pens. How many?\n\nAssistant: ")
    assert enc["labels"][-1] == plain.eos_token_id


def test_response_loss_ignores_prompt_tokens(tiny_llama):
    model, tok = _load(tiny_llama)
    batch = collate([tokenize_example(tok, [{"role": "user", "content": q}], r, 256)
                     for q, r in [("2+2?", "#### 4"), ("A longer question here?", "It is 5.\n#### 5")]], tok.pad_token_id)
    with torch.no_grad():
        loss = response_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for b in range(2):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][b, t] != IGNORE:
                terms.append(-torch.log_softmax(logits[b, t - 1], -1)[batch["labels"][b, t]])
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)
    assert len(terms) == int((batch["labels"] != IGNORE).sum())  # padding and prompt positions excluded
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_training_lowers_loss(tiny_llama, sft_file):
    model, tok = _load(tiny_llama)
    model, report = train_model(model, tok, load_examples(_cfg(sft_file)), _cfg(sft_file, epochs=6))
    assert report["steps"] == 6 * 3  # 12 rows -> 2 held out, 10 in batches of 4
    assert report["eval_examples"] == 2 and report["train_examples"] == 10
    assert report["train_loss_last"] < report["train_loss_first"] - 0.5
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert report["masked_modules"] == 0


def _sparsify(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in target_linears(model).values():
            lin.weight.mul_(torch.rand(lin.weight.shape, generator=g) >= 0.5)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_sparse_student_keeps_its_zeros(tiny_llama, sft_file, lora_rank):
    pytest.importorskip("peft") if lora_rank else None
    model, tok = _load(tiny_llama)
    _sparsify(model)
    masks = extract_masks(model)
    before = {n: lin.weight.detach().clone() for n, lin in target_linears(model).items()}
    assert len(masks) == len(before) and all(abs((~m).float().mean() - 0.5) < 0.05 for m in masks.values())
    cfg = _cfg(sft_file, epochs=2, lr=1e-2, lora_rank=lora_rank, weight_decay=0.1)
    model, report = train_model(model, tok, load_examples(cfg), cfg)
    assert report["mode"] == ("full" if lora_rank == 0 else "lora-r4")
    assert report["zero_positions_changed"] == 0
    after = target_linears(model)
    assert set(after) == set(before)  # a merged LoRA leaves plain linears with the same names
    for name, keep in masks.items():
        w = after[name].weight
        assert torch.equal(w != 0, keep), name  # exactly the same zero positions
        assert not torch.equal(w, before[name])  # and the kept weights did train
    assert type(model).__name__ == "LlamaForCausalLM"


def _die_in_epoch_2(monkeypatch):
    """Make training raise KeyboardInterrupt on the 2nd batch of epoch 2; returns the real loss function."""
    calls = {"n": 0}
    real = train_mod.response_loss

    def dies_in_epoch_2(model, batch, *args):
        calls["n"] += 1
        if calls["n"] == 3 + 1 + 2:  # 3 train + 1 eval batch in epoch 1, then the 2nd batch of epoch 2
            raise KeyboardInterrupt
        return real(model, batch, *args)

    monkeypatch.setattr(train_mod, "response_loss", dies_in_epoch_2)
    return real


def test_checkpoint_resume_continues_from_last_epoch(tiny_llama, sft_file, tmp_path, monkeypatch):
    cfg = _cfg(sft_file, epochs=2, checkpoints=True)
    examples = load_examples(cfg)
    model, tok = _load(tiny_llama)
    real = _die_in_epoch_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_model(model, tok, examples, cfg, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "epoch-1" / "trainer.json").is_file()

    monkeypatch.setattr(train_mod, "response_loss", real)
    model, tok = _load(tiny_llama)
    model, report = train_model(model, tok, examples, cfg, tmp_path / "ckpt")
    assert report["steps"] == 6 and [h["epoch"] for h in report["history"]] == [1, 2]
    assert report["eval_loss_before"] is None  # resumed: the pre-training eval belongs to the first run
    # the same settings from scratch reach the same weights as the interrupted + resumed run
    fresh, _ = train_model(_load(tiny_llama)[0], tok, examples, cfg.model_copy(update={"checkpoints": False}))
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), n


def test_checkpoint_of_another_student_is_not_resumed(tiny_llama, sft_file, tmp_path, monkeypatch, capsys):
    """A checkpoint left by student A (killed in epoch 2) is never loaded into student B of the same shapes
    (another pruning or sparsity of the same model): B trains afresh and says why."""
    cfg = _cfg(sft_file, epochs=2, checkpoints=True)
    examples = load_examples(cfg)
    real = _die_in_epoch_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_model(_load(tiny_llama)[0], _load(tiny_llama)[1], examples, cfg, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "epoch-1" / "trainer.json").is_file()
    monkeypatch.setattr(train_mod, "response_loss", real)

    student_b, tok = _load(tiny_llama)
    _sparsify(student_b)  # same shapes, other weights
    capsys.readouterr()
    model, report = train_model(student_b, tok, examples, cfg, tmp_path / "ckpt")
    assert "another student" in capsys.readouterr().err
    assert report["eval_loss_before"] is not None and [h["epoch"] for h in report["history"]] == [1, 2]
    fresh_b, _ = _load(tiny_llama)
    _sparsify(fresh_b)
    fresh, _ = train_model(fresh_b, tok, examples, cfg.model_copy(update={"checkpoints": False}))
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), n


@pytest.mark.parametrize("content", ["{}", "[]", '{"epoch": "1", "step": 3}', '{"step": 3}', "null"])
def test_a_corrupt_trainer_json_is_an_unreadable_checkpoint(content, tmp_path, capsys):
    """A trainer.json that is JSON but not the object training writes is skipped like unreadable JSON: training
    starts afresh (no KeyError or TypeError, exit 1), and a good checkpoint beside it is still found."""
    (tmp_path / "epoch-2").mkdir()
    (tmp_path / "epoch-2" / "trainer.json").write_text(content)
    assert train_mod._resume(tmp_path, "fp", "student", accelerator=None) == (0, 0, [])
    (tmp_path / "epoch-1").mkdir()
    (tmp_path / "epoch-1" / "trainer.json").write_text(json.dumps({"epoch": 1, "step": 3, "fingerprint": "old"}))
    assert train_mod._resume(tmp_path, "fp", "student", accelerator=None) == (0, 0, [])
    err = capsys.readouterr().err
    assert "ignoring checkpoint" in err and "epoch-1" in err  # the good one was read (and found another's)
