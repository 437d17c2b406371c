"""Regeneration: draftkit's batched decoder equals plain `generate`, rows carry provenance, runs resume
without redoing rows, and interruptions or write failures lose nothing."""

import errno
import importlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from draftkit.distill import DistillConfig, regenerate
from draftkit.distill.regenerate import HFEngine, append_rows, read_done_rows
from draftkit.errors import DataError, InvalidInputError
from tests._helpers_distill import one_thread, sft_file
from tests.conftest import make_rows

regen_mod = importlib.import_module("draftkit.distill.regenerate")  # the package's `regenerate` is the function

FIXTURES = (one_thread, sft_file)  # pytest finds fixtures by name in this module
pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(tok, n):
    return [tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                                    tokenize=True)["input_ids"] for r in make_rows(n, seed=7)]


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # llama: refilling batches; mistral: sliding-window cache
def test_engine_matches_generate_with_early_stops(arch, tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    prompts = _prompts(tok, 10)
    steps = 12
    with torch.no_grad():
        plain = [model.generate(torch.tensor([p]), max_new_tokens=steps, do_sample=False, pad_token_id=0)[0, len(p):]
                 for p in prompts]
    # make a token the model often emits mid-way an end-of-sequence token, so rows stop at different steps
    def spread(tok_id):  # distinct first positions of tok_id over the rows (-1: never)
        return len({out.tolist().index(tok_id) if tok_id in out.tolist() else -1 for out in plain})

    stop = max({t for out in plain for t in out.tolist()}, key=spread)
    model.generation_config.eos_token_id = stop
    with torch.no_grad():
        want = []
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=steps, do_sample=False, pad_token_id=0)[0, len(p):]
            want.append(out.tolist())
    lengths = {len(w) for w in want}
    assert len(lengths) > 2  # rows really stop at different steps
    engine = HFEngine(model, tok, max_new_tokens=steps, batch_size=4)
    got = {}
    for group in engine.generate(prompts):
        for g in group:
            got[g.pos] = g
    assert sorted(got) == list(range(len(prompts)))
    for i, w in enumerate(want):
        # generate pads stopped rows with pad tokens; compare up to and including the stop token
        w = w[: w.index(stop) + 1] if stop in w else w
        assert got[i].new_tokens == len(w), i
        assert got[i].text == tok.decode(w, skip_special_tokens=True), i
        assert got[i].finished == (w[-1] == stop)


def test_regenerate_writes_rows_and_resumes(tiny_llama, sft_file, tmp_path, monkeypatch):
    cfg = DistillConfig(dataset=str(sft_file), teacher=str(tiny_llama), max_new_tokens=6, batch_size=4)
    calls = []
    real = HFEngine.generate

    def interrupted(self, prompts):
        calls.append(len(prompts))
        for i, group in enumerate(real(self, prompts)):
            yield group
            if i == 0:
                raise KeyboardInterrupt

    monkeypatch.setattr(HFEngine, "generate", interrupted)
    out = tmp_path / "regen"
    with pytest.raises(KeyboardInterrupt):
        regenerate(cfg, out)
    kept = read_done_rows(out / "rows.jsonl")
    assert 0 < len(kept) < 12  # the first finished group was written before the interruption

    monkeypatch.setattr(HFEngine, "generate", lambda self, prompts: (calls.append(len(prompts)), real(self, prompts))[1])
    report = regenerate(cfg, out)
    assert calls == [12, 12 - len(kept)]  # the second run generated only the missing rows
    assert report["rows"] == 12 and report["resumed"] == len(kept) and report["generated_now"] == 12 - len(kept)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(12))  # complete, once each, in dataset order
    src = [json.loads(line) for line in sft_file.read_text().splitlines()]
    for r, s in zip(rows, src, strict=True):
        assert r["teacher"] == str(tiny_llama) and r["template_hash"] and r["engine"] == "hf"
        assert r["reference"] == s["answer"] and r["prompt"] == s["question"]
        assert isinstance(r["accepted"], bool) and r["reason"]
        # a random teacher never reaches the right answer: the original response is kept
        assert not r["accepted"] and r["response"] == s["answer"]
        assert r["messages"] == [{"role": "user", "content": s["question"]}, {"role": "assistant", "content": s["answer"]}]
    assert json.loads((out / "regenerate.json").read_text())["acceptance_rate"] == 0.0

    calls.clear()
    assert regenerate(cfg, out)["generated_now"] == 0 and calls == []  # all done: nothing regenerated
    other = cfg.model_copy(update={"template": "{instruction}"})
    with pytest.raises(Exception, match="template"):
        regenerate(other, out)  # refuses to mix rows made with another template


def test_accepted_rewrites_replace_the_response(tiny_llama, sft_file, tmp_path, monkeypatch):
    src = [json.loads(line) for line in sft_file.read_text().splitlines()]

    def fake(self, prompts):  # even rows: a correct rewrite; odd rows: a wrong one
        out = []
        for i, p in enumerate(prompts):
            text = self.tok.decode(p)
            row = next(r for r in src if r["question"] in text)
            answer = row["answer"].split("#### ")[1]
            reply = f"Rewritten.\n#### {answer}" if int(answer) % 2 == 0 else "Wrong.\n#### -1"
            out.append(regen_mod.Generation(i, reply, 5, True))
        yield out

    monkeypatch.setattr(HFEngine, "generate", fake)
    cfg = DistillConfig(dataset=str(sft_file), teacher=str(tiny_llama), max_new_tokens=6)
    report = regenerate(cfg, tmp_path / "r")
    rows = read_done_rows(tmp_path / "r" / "rows.jsonl")
    even = [r for r in rows if int(r["reference"].split("#### ")[1]) % 2 == 0]
    assert report["accepted"] == len(even) > 0
    for r in rows:
        if r in even:
            assert r["accepted"] and r["response"].startswith("Rewritten.") and r["messages"][-1]["content"] == r["response"]
        else:
            assert not r["accepted"] and r["response"] == r["reference"] and "!=" in r["reason"]


def test_torn_last_line_is_cut(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "resp')
    assert [r["id"] for r in read_done_rows(path)] == ["a", "b"]
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'


def test_append_rows_disk_full_leaves_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    append_rows(path, [{"id": "a"}])
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(regen_mod.os, "fsync", full)
    with pytest.raises(DataError, match="No space left on device.*re-run to resume"):
        append_rows(path, [{"id": "b"}, {"id": "c"}])
    assert path.read_bytes() == before


@pytest.mark.gpu
def test_vllm_engine_writes_same_rows(tiny_llama, sft_file, tmp_path):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    base = dict(dataset=str(sft_file), teacher=str(tiny_llama), max_new_tokens=6, batch_size=4)
    hf = regenerate(DistillConfig(**base), tmp_path / "hf", device="cuda")
    vl = regenerate(DistillConfig(**base, engine="vllm"), tmp_path / "vllm")
    assert hf["rows"] == vl["rows"] == 12
    a = read_done_rows(tmp_path / "hf" / "rows.jsonl")
    b = read_done_rows(tmp_path / "vllm" / "rows.jsonl")
    assert [set(r) for r in a] == [set(r) for r in b]
    assert [r["id"] for r in a] == [r["id"] for r in b]


def test_stale_rows_are_never_reused(tiny_llama, sft_file, tmp_path, capsys):
    """Rows made by another version of the teacher (same name, other weights) or with other generation settings
    are an error in a user's folder and are regenerated, with one line saying why, in a work folder."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_llama, teacher)
    cfg = DistillConfig(dataset=str(sft_file), teacher=str(teacher), max_new_tokens=4, batch_size=12)
    out = tmp_path / "regen"
    regenerate(cfg, out)
    capsys.readouterr()
    assert regenerate(cfg, out)["generated_now"] == 0  # unchanged: reused, and said so
    assert "12 rows already in" in capsys.readouterr().err

    longer = cfg.model_copy(update={"max_new_tokens": 6})
    with pytest.raises(InvalidInputError, match="other generation settings"):
        regenerate(longer, out)
    report = regenerate(longer, out, restart_stale=True)
    assert report["generated_now"] == 12 and report["resumed"] == 0
    assert "discarding the 12 rows" in capsys.readouterr().err

    model = AutoModelForCausalLM.from_pretrained(teacher)  # a retrained teacher under the same name
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(teacher)
    with pytest.raises(InvalidInputError, match="its weights changed"):
        regenerate(longer, out)
    assert regenerate(longer, out, restart_stale=True)["generated_now"] == 12


def test_rows_made_in_another_teacher_dtype_are_stale_and_keyed_apart(tiny_llama, sft_file, tmp_path):
    from draftkit.compute import computing, resolve_compute
    from draftkit.reuse import rows_key

    cfg = DistillConfig(dataset=str(sft_file), teacher=str(tiny_llama), max_new_tokens=4, batch_size=12)
    out = tmp_path / "regen"
    regenerate(cfg, out, dtype="float32")
    assert regenerate(cfg, out, dtype="float32")["generated_now"] == 0
    with pytest.raises(InvalidInputError, match="other generation settings"):
        regenerate(cfg, out, dtype="bfloat16")  # a bf16 teacher answers differently: not the same rows
    # the cache key follows the dtype distill loads the teacher in: teacher_dtype, else the compute dtype
    bf16 = cfg.model_copy(update={"teacher_dtype": "bfloat16"})
    assert rows_key(bf16) != rows_key(cfg)
    with computing(resolve_compute("bfloat16", "cpu")):  # compute auto on an AMX CPU resolves to this
        assert rows_key(cfg) == rows_key(bf16)
