"""`spec --engine vllm` against vLLM itself: runs only where vLLM is installed and a GPU is present (never on the
machines draftkit is developed on; the README says so)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from draftkit.evaluate.spec import SpecConfig, run_spec
from tests._helpers_export_eval import write_jsonl
from tests.conftest import make_rows

pytestmark = [pytest.mark.vllm, pytest.mark.gpu]


def test_vllm_engine_self_draft(tiny_llama, tmp_path):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).cuda().eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = write_jsonl(tmp_path / "p.jsonl", make_rows(4, seed=3))
    cfg = SpecConfig(target=str(tiny_llama), prompts=str(prompts), k=3, max_new_tokens=16, engine="vllm", repeats=2,
                     stop_at_eos=False)
    r = run_spec(model, tok, model, tok, cfg)
    assert r["engine"] == "vllm" and r["outputs_identical"] is True
    # a model drafting for itself: vLLM accepts every proposal, like draftkit's loop
    assert r["vllm_mean_acceptance_length"] == pytest.approx(r["mal_per_step"], rel=0.05)
    assert r["speedup"] > 0
