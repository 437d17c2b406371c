"""`spec --engine vllm` hands vLLM the draft that is in memory: a recipe's pruned model (its source folder still
in ``name_or_path``) is read from the folder the prune stage wrote, and a draft changed in memory outside a
recipe is saved to a temporary folder, removed afterwards. vLLM itself is replaced by a recorder of what it
would load (tests/test_spec_vllm.py runs the real one on a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from draftkit.evaluate import spec as spec_mod
from draftkit.evaluate.spec import SpecConfig, run_spec
from draftkit.pipeline import run
from draftkit.recipe import load_recipe
from tests._helpers_export_eval import write_jsonl
from tests.conftest import make_rows


@pytest.fixture
def vllm_seen(monkeypatch):
    """What vLLM would load as the draft: its folder, layer count and weights, read when it is called."""
    seen: list[dict] = []

    def record(draft_dir, target_ref, prompt_ids, **kw):
        folder = Path(draft_dir)
        weights = {}
        for shard in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(shard))
        seen.append({"dir": folder, "layers": json.loads((folder / "config.json").read_text())["num_hidden_layers"],
                     "weights": weights})
        return {}

    monkeypatch.setattr(spec_mod, "check_vllm", lambda: None)
    monkeypatch.setattr(spec_mod, "run_vllm", record)
    return seen


def test_recipe_spec_vllm_reads_the_pruned_draft(tiny_llama, tmp_path, vllm_seen):
    prompts = write_jsonl(tmp_path / "p.jsonl", make_rows(2, seed=5))
    recipe = {"name": "r", "model": str(tiny_llama), "output": str(tmp_path / "run"), "load": {"device": "cpu", "stream": "off"},
              "stages": [{"prune": {"drop": "1"}},  # resident: the pruned model is handed on in memory
                         {"spec": {"target": str(tiny_llama), "prompts": str(prompts), "limit": 1,
                                   "max_new_tokens": 4, "k": 2, "engine": "vllm"}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    report = run(load_recipe(str(tmp_path / "r.yaml")))
    pruned = Path(report["stages"][0]["report"]["output"])
    before = json.loads((Path(tiny_llama) / "config.json").read_text())["num_hidden_layers"]
    [seen] = vllm_seen
    assert report["stages"][1]["report"].get("engine") == "vllm"
    assert seen["dir"].resolve() == pruned.resolve() and seen["layers"] == before - 1


def test_a_draft_changed_in_memory_is_saved_for_vllm_and_the_copy_removed(tiny_llama, tmp_path, vllm_seen):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.5)  # differs from the folder its name_or_path names
    assert Path(model.name_or_path) == Path(tiny_llama)
    prompts = write_jsonl(tmp_path / "p.jsonl", make_rows(1, seed=5))
    cfg = SpecConfig(target=str(tiny_llama), prompts=str(prompts), k=2, max_new_tokens=4, engine="vllm")
    run_spec(model, tok, model, tok, cfg)
    [seen] = vllm_seen
    assert seen["dir"].resolve() != Path(tiny_llama).resolve()
    assert torch.equal(seen["weights"]["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert not seen["dir"].exists()  # the temporary copy is gone
