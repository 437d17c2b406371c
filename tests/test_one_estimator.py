"""One memory estimator: ``--dry-run`` (and preflight, which reads the same numbers) gives a layer-wise stage the
estimate its command prints before the heavy work (draftkit.estimates reads each stage's registered estimate)."""

from __future__ import annotations

import pytest
import torch

import draftkit.memory_stages as memory_stages
from draftkit.checkpoint import load_model_and_tokenizer
from draftkit.data import CalibConfig
from draftkit.estimates import count_params
from draftkit.export import ExportConfig, _state_dict_for_save, sparse_modules
from draftkit.memory_stages import export_estimate, export_recipe_parts, spec_estimate, spec_recipe_parts
from draftkit.prune import PruneConfig
from draftkit.sparsify import SparsifyConfig
from draftkit.sparsify.config import config_after
from draftkit.stages import LoadConfig, run_stage


@pytest.mark.parametrize("stream", ["off", "on"])
def test_dry_run_estimates_what_the_command_prints(stream, tiny_llama, calib_file, tmp_path):
    from draftkit.pipeline import plan
    from draftkit.recipe import load_recipe

    calib = {"path": str(calib_file), "samples": 8, "seqlen": 32}
    rec = tmp_path / "r.yaml"
    rec.write_text(f"name: one\nmodel: {tiny_llama}\noutput: {tmp_path / 'run'}\nload: {{stream: '{stream}'}}\n"
                   f"stages:\n  - prune: {{layers: 1, calib: {calib}}}\n  - sparsify: {{method: wanda, calib: {calib}}}\n")
    dry = plan(load_recipe(str(rec)))["stages"]
    load = LoadConfig(stream=stream)
    pruned = run_stage("prune", str(tiny_llama), PruneConfig(layers=1, calib=CalibConfig(**calib)), out=tmp_path / "p",
                       load=load)
    assert dry[0]["estimated_memory_bytes"] == pytest.approx(pruned["memory_estimate_gb"]["host"] * 1e9, abs=1e6)
    sparse = run_stage("sparsify", str(tmp_path / "p"), SparsifyConfig(method="wanda", calib=CalibConfig(**calib)),
                       out=tmp_path / "s", load=load)
    # the recipe sizes stage 1's input from the config (the pruned folder does not exist yet): within a few percent
    assert dry[1]["estimated_memory_bytes"] == pytest.approx(sparse["memory_estimate_gb"]["host"] * 1e9, rel=0.05)


def test_dry_run_estimates_export_and_spec_as_their_commands_print(tiny_llama, calib_file, tmp_path, monkeypatch):
    """export's and spec's recipe estimates are the arithmetic their commands print (draftkit.memory_stages), from
    the configs: export writes the layouts at the sparsity the sparsify stage before it asked."""
    from draftkit.evaluate.spec import SpecConfig
    from draftkit.pipeline import plan
    from draftkit.recipe import load_recipe

    spec = {"target": str(tiny_llama), "prompts": str(calib_file), "limit": 2, "repeats": 1, "max_new_tokens": 8}
    rec = tmp_path / "r.yaml"
    rec.write_text(f"name: one\nmodel: {tiny_llama}\noutput: {tmp_path / 'run'}\nload: {{stream: 'off'}}\n"
                   f"stages:\n  - sparsify: {{method: magnitude, sparsity: 0.5}}\n  - export: {{}}\n"
                   f"  - spec: {spec}\n")
    dry = plan(load_recipe(str(rec)))["stages"]
    run_stage("sparsify", str(tiny_llama), SparsifyConfig(method="magnitude", sparsity=0.5), out=tmp_path / "s",
              load=LoadConfig(stream="off"))
    exported = run_stage("export", str(tmp_path / "s"), ExportConfig(), out=tmp_path / "e")
    assert exported["compressed_modules"] > 0
    assert dry[1]["estimated_memory_bytes"] == pytest.approx(exported["memory_estimate_gb"]["host"] * 1e9, abs=6e6)
    measured = run_stage("spec", str(tmp_path / "s"), SpecConfig(**spec), out=tmp_path / "m")
    assert dry[2]["estimated_memory_bytes"] == pytest.approx(measured["memory_estimate_gb"]["host"] * 1e9, abs=6e6)

    # part by part (the printed figures are rounded to MB): the recipe's arithmetic on the configs against the
    # command's on the model in memory
    model, _ = load_model_and_tokenizer(str(tmp_path / "s"), device="cpu")
    hf = config_after(model.config, SparsifyConfig(method="magnitude", sparsity=0.5))
    size = count_params(hf) * 4
    recipe = export_recipe_parts(hf, ExportConfig(), LoadConfig(), size)
    command = export_parts = export_estimate(model, _state_dict_for_save(model), list(sparse_modules(model, 0.1)))
    for part in ("weights", "sparse_layout"):
        assert recipe.parts[part] == pytest.approx(command.parts[part], rel=0.01), part
    assert recipe.parts["cast_copy"] == command.parts["cast_copy"] == 0
    in_bf16 = export_recipe_parts(hf, ExportConfig(dtype="bfloat16"), LoadConfig(), size)
    assert in_bf16.parts["cast_copy"] == size // 2 and in_bf16.parts["sparse_layout"] < recipe.parts["sparse_layout"]
    assert export_recipe_parts(model.config, ExportConfig(), LoadConfig(), size).parts["sparse_layout"] == 0
    recipe = spec_recipe_parts(hf, SpecConfig(**spec), LoadConfig(), size)
    command = spec_estimate(model, str(tiny_llama), compute=torch.float32, trust_remote_code=False)
    for part in ("draft", "target", "target_load"):
        assert recipe.parts[part] == pytest.approx(command.parts[part], rel=0.01), part

    # and --dry-run reads them (without the process's fixed share, the stage's own bytes)
    monkeypatch.setattr(memory_stages, "PROCESS_BYTES", 0)
    dry = plan(load_recipe(str(rec)))["stages"]
    assert dry[1]["estimated_memory_bytes"] == pytest.approx(sum(export_parts.parts.values()), rel=0.01)
    assert dry[2]["estimated_memory_bytes"] == pytest.approx(sum(command.parts.values()), rel=0.01)


def test_dry_run_estimates_a_merge_as_its_command_prints(tiny_llama, tmp_path):
    from draftkit.merge import MergeConfig, merge_checkpoints
    from draftkit.pipeline import plan
    from draftkit.recipe import load_recipe

    rec = tmp_path / "r.yaml"
    rec.write_text(f"name: one\nmodel: {tiny_llama}\noutput: {tmp_path / 'run'}\n"
                   f"stages:\n  - merge: {{models: ['{tiny_llama}', '{tiny_llama}']}}\n")
    dry = plan(load_recipe(str(rec)))["stages"]
    merged = merge_checkpoints([str(tiny_llama)] * 2, MergeConfig(models=[str(tiny_llama)] * 2), out=tmp_path / "m",
                               load=LoadConfig())
    assert dry[0]["estimated_memory_bytes"] == pytest.approx(merged["memory_estimate_gb"]["host"] * 1e9, abs=1e6)


def test_search_estimate_is_the_target_and_its_largest_step_by_that_steps_own_estimate(tiny_llama, calib_file):
    """A search holds the target all along; beside it runs one step at a time, each estimated by its own stage's
    registered estimate (the one its command prints), resident: the largest sets the search's estimate."""
    from draftkit.checkpoint import load_config
    from draftkit.distill.estimate import recipe_estimate as distill_estimate
    from draftkit.estimates import count_params
    from draftkit.memory import PROCESS_BYTES, checkpoint_bytes
    from draftkit.prune.config import config_after as pruned
    from draftkit.prune.layerwise import recipe_estimate as prune_estimate
    from draftkit.search import SearchConfig, recipe_estimate
    from draftkit.search.estimate import measurement_bytes
    from draftkit.search.grid import plan

    hf, size, load = load_config(str(tiny_llama)), checkpoint_bytes(str(tiny_llama)), LoadConfig(stream="on")
    data = {"dataset": str(calib_file), "prompts": str(calib_file), "calib": {"path": str(calib_file)}}
    for batch in (2, 64):
        cfg = SearchConfig(drop=[1], healing=["sft"], train_batch_size=batch, **data)
        steps, cands = plan(cfg, target="t", rows="r.jsonl")
        heal = next(s.config for s in steps.values() if s.stage == "distill")
        prune = next(s.config for s in steps.values() if s.stage == "prune")
        train = distill_estimate(hf, heal, load, size) - PROCESS_BYTES
        pruning = prune_estimate(hf, prune, LoadConfig(stream="off"), size) - PROCESS_BYTES
        measuring = measurement_bytes(hf, cands, load, size)
        assert recipe_estimate(hf, cfg, load, size) == PROCESS_BYTES + size + max(train, pruning, measuring), batch
    assert train > max(pruning, measuring)  # at 64 sequences the training is the largest step

    # a measurement: the draft (one block fewer) in float32 as stored, and when spec computes in bf16 the target's
    # and the draft's bf16 casts beside them; the target drafting for itself adds only its cast
    params, draft = count_params(hf), count_params(pruned(hf, PruneConfig(layers=1)))
    assert measuring == draft * 4 < size
    assert measurement_bytes(hf, cands, LoadConfig(compute="bfloat16"), size) == draft * 4 + (params + draft) * 2
    itself = plan(SearchConfig(drop=[0], healing=["none"], **data), target="t", rows="r.jsonl")[1]
    assert measurement_bytes(hf, itself, LoadConfig(compute="bfloat16"), size) == params * 2
    assert measurement_bytes(hf, itself, load, size) == 0


def test_search_prints_its_estimate_with_the_longest_row_its_trainings_pad_to(tiny_llama, calib_file):
    """The printed search estimate sizes the trainings by the data (micro-batches pad to their longest row), as
    the distill command does; a recipe's (no data at hand) assumes max_length."""
    from draftkit.checkpoint import load_config, load_tokenizer
    from draftkit.distill.loss import tokenize_example
    from draftkit.distill.rows import load_examples
    from draftkit.memory import checkpoint_bytes
    from draftkit.search import SearchConfig, longest_training_row, recipe_estimate
    from draftkit.search.grid import heal_config

    tok = load_tokenizer(str(tiny_llama))
    data = {"dataset": str(calib_file), "prompts": str(calib_file), "rows": 8, "max_length": 4096}
    sft = SearchConfig(drop=[1], healing=["sft"], **data)
    rows = [len(tokenize_example(tok, e.prompt, e.reference, 4096)["input_ids"])
            for e in load_examples(heal_config(sft, "sft", 0, target="t", rows=None))]
    assert longest_training_row(sft, tok) == max(rows) < 4096
    assert longest_training_row(sft.model_copy(update={"max_length": 16}), tok) == 16
    sdd = SearchConfig(drop=[1], healing=["sdd"], regen_max_new_tokens=100, **data)
    assert longest_training_row(sdd, tok) > 100
    assert longest_training_row(SearchConfig(drop=[1], healing=["none"], **data), tok) is None
    hf, size, load = load_config(str(tiny_llama)), checkpoint_bytes(str(tiny_llama)), LoadConfig()
    big = sft.model_copy(update={"train_batch_size": 256})
    assert recipe_estimate(hf, big, load, size, longest=max(rows)) < recipe_estimate(hf, big, load, size)
