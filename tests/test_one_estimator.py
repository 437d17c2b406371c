"""One memory estimator: ``--dry-run`` (and preflight, which reads the same numbers) gives a layer-wise stage the
estimate its command prints before the heavy work (draftkit.estimates reads each stage's registered estimate)."""

from __future__ import annotations

import pytest

from draftkit.data import CalibConfig
from draftkit.prune import PruneConfig
from draftkit.sparsify import SparsifyConfig
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
