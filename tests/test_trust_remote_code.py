"""--trust-remote-code reaches every model a stage loads (distill's teacher, eval's baseline, spec's and export's
target), for the CLI's stages and recipes alike, and is never set without the user's flag. The remote-code model
is the tiny llama behind an ``auto_map`` to code in its own folder (transformers refuses it without the flag)."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest

from draftkit.distill import DistillConfig, check_distill
from draftkit.errors import DraftkitError
from draftkit.evaluate import EvalConfig
from draftkit.evaluate.spec import SpecConfig
from draftkit.stages import LoadConfig, run_stage, trusting
from tests._helpers_distill import sft_file
from tests._helpers_export_eval import write_jsonl
from tests.conftest import make_rows

FIXTURES = (sft_file,)


@pytest.fixture(scope="module")
def remote_model(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("remote") / "tinyremote"
    shutil.copytree(tiny_llama, out)
    (out / "configuration_tinyremote.py").write_text(textwrap.dedent("""
        from transformers import LlamaConfig
        class TinyRemoteConfig(LlamaConfig):
            model_type = "tinyremote"
    """))
    (out / "modeling_tinyremote.py").write_text(textwrap.dedent("""
        from transformers import LlamaForCausalLM
        from .configuration_tinyremote import TinyRemoteConfig
        class TinyRemoteForCausalLM(LlamaForCausalLM):
            config_class = TinyRemoteConfig
    """))
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(model_type="tinyremote", architectures=["TinyRemoteForCausalLM"],
               auto_map={"AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
                         "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM"})
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_teacher_config_is_read_with_the_flag(remote_model, sft_file):
    cfg = DistillConfig(dataset=str(sft_file), teacher=str(remote_model))
    with pytest.raises(DraftkitError):
        check_distill(None, cfg)  # no flag: the teacher's code never runs
    check_distill(None, cfg.model_copy(update={"teacher_trust_remote_code": True}))


def test_trusting_follows_the_load_flag_only():
    spec = SpecConfig(target="t", prompts="p.jsonl")
    assert trusting(spec, LoadConfig())._trust_remote_code is False
    assert trusting(spec, LoadConfig(trust_remote_code=True))._trust_remote_code is True
    assert spec._trust_remote_code is False  # a copy: the recipe's own config is unchanged
    assert trusting(EvalConfig(tasks=["tiny-arith"]), LoadConfig(trust_remote_code=True))._trust_remote_code is True
    distill = DistillConfig(dataset="d.jsonl", teacher="t")
    assert trusting(distill, LoadConfig(trust_remote_code=True)).teacher_trust_remote_code is True
    assert trusting(distill, LoadConfig()).teacher_trust_remote_code is False


def test_spec_target_with_remote_code(remote_model, tiny_llama, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["question"]} for r in make_rows(2)])
    cfg = SpecConfig(target=str(remote_model), prompts=str(prompts), k=2, max_new_tokens=4, limit=2)
    with pytest.raises(DraftkitError):
        run_stage("spec", str(tiny_llama), cfg, out=tmp_path / "no", load=LoadConfig(device="cpu"))
    report = run_stage("spec", str(tiny_llama), cfg, out=tmp_path / "yes",
                       load=LoadConfig(device="cpu", trust_remote_code=True))
    assert report["output"] == str(tmp_path / "yes")


def test_eval_baseline_and_serve_target_get_the_flag(remote_model, tiny_llama, monkeypatch):
    import draftkit.evaluate as ev
    from draftkit.serve import check_serving

    seen = []
    monkeypatch.setattr(ev, "measure", lambda name, cfg, load: seen.append(load.trust_remote_code) or {})
    cfg = EvalConfig(tasks=["tiny-arith"], baseline=str(remote_model), cache=False)
    ev.baseline_results(trusting(cfg, LoadConfig(trust_remote_code=True)))
    ev.baseline_results(cfg)
    assert seen == [True, False]
    import draftkit.checkpoint as ckpt

    real, asked = ckpt.load_tokenizer, []
    monkeypatch.setattr(ckpt, "load_tokenizer", lambda name, **kw: asked.append(kw.get("trust_remote_code")) or real(name, **kw))
    assert check_serving(tiny_llama, str(remote_model), "vllm", trust_remote_code=True)["checks"]
    assert asked[-1] is True  # the target's tokenizer is read with the flag
