"""The stage runner reads what it needs of its input in one trip before any weights load
(draftkit/checkpoint/facts.py): config, text config, device, streamability, size, weight files, and the stored
tensor shapes against the config."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from draftkit.checkpoint.facts import checkpoint_bytes, read_facts
from draftkit.errors import ModelLoadError


def test_facts_of_a_local_checkpoint(tiny_llama):
    facts = read_facts(str(tiny_llama))
    assert facts.name == str(tiny_llama) and facts.can_stream and facts.device == torch.device("cpu")
    assert [f.name for f in facts.files] == ["model.safetensors"]
    assert facts.size == checkpoint_bytes(tiny_llama) == (tiny_llama / "model.safetensors").stat().st_size
    assert facts.text is facts.config and facts.config.num_hidden_layers == 6


def test_a_config_that_does_not_belong_to_the_weights_fails_before_any_load(tiny_llama, calib_file, tmp_path,
                                                                             monkeypatch):
    """prune on a folder whose config.json says another width: one line naming the tensor, and no weights loaded
    (the whole-model loader is never reached)."""
    import draftkit.checkpoint.load as load
    from draftkit.data import CalibConfig
    from draftkit.prune import PruneConfig
    from draftkit.stages import run_stage

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the stored MLP weights are 128 wide
    (model / "config.json").write_text(json.dumps(cfg))

    def never(*a, **kw):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(load, "_load_pretrained", never)
    with pytest.raises(ModelLoadError, match="has shape .* but config.json implies"):
        run_stage("prune", str(model), PruneConfig(layers=1, calib=CalibConfig(path=str(calib_file), samples=2, seqlen=16)),
                  out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shapes_are_read_once_per_files_and_config(tiny_llama, tmp_path, monkeypatch):
    """The runner's facts trip and the loader after it check the same files against the same config: the headers
    are read once; a rewritten file or another config is checked again, and a failed check is never remembered."""
    import os

    import draftkit.checkpoint.load as load
    from draftkit.checkpoint.files import load_config

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    files = [model / "model.safetensors"]
    config = load_config(str(model))
    built = []
    real = load.empty_model
    monkeypatch.setattr(load, "empty_model", lambda *a, **kw: built.append(1) or real(*a, **kw))
    load.check_tensor_shapes(files, config)
    load.check_tensor_shapes(files, config)
    assert len(built) == 1
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the file changed
    load.check_tensor_shapes(files, config)
    assert len(built) == 2
    config.intermediate_size = 96  # another config: checked, and it fails every time
    for _ in range(2):
        with pytest.raises(ModelLoadError, match="has shape"):
            load.check_tensor_shapes(files, config)
    assert len(built) == 4
