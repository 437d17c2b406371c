"""#22: a model folder downloaded from anywhere never makes draftkit open a file outside it.

A shard index naming ``../victim/...`` or an absolute path, a weight file or config that is a symlink out of
the folder, or a symlink loop: every command refuses it with one line (exit 2), in the resident and the
streamed paths, before any weights are read and without writing an output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.errors import EXIT_INVALID_INPUT, ModelLoadError
from tests._helpers_distill import sft_file

FIXTURES = (sft_file,)
KINDS = ["dotdot-index", "absolute-index", "symlinked-weights", "symlinked-shard", "symlinked-config"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(result, out: Path | None = None) -> str:
    assert result.exit_code == EXIT_INVALID_INPUT, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "outside the model directory" in lines[0] or "absolute path" in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
    return lines[0]


def hostile(src: Path, root: Path, kind: str) -> Path:
    """A copy of ``src`` whose weights come from ``root/victim`` (a copy too) in the way ``kind`` names."""
    victim, model = root / "victim", root / "model"
    if not victim.exists():
        shutil.copytree(src, victim)
    shutil.copytree(src, model)
    (model / "model.safetensors").unlink()
    keys = _keys(src / "model.safetensors")
    if kind == "dotdot-index":
        target = "../victim/model.safetensors"
    elif kind == "absolute-index":
        target = str((victim / "model.safetensors").resolve())
    elif kind == "symlinked-shard":
        target = "model-00001-of-00001.safetensors"
        (model / target).symlink_to(victim / "model.safetensors")
    elif kind == "symlinked-weights":
        (model / "model.safetensors").symlink_to(victim / "model.safetensors")
        return model
    elif kind == "symlinked-config":
        shutil.copy(src / "model.safetensors", model / "model.safetensors")
        (model / "config.json").unlink()
        (model / "config.json").symlink_to(victim / "config.json")
        return model
    else:
        raise ValueError(kind)
    index = {"metadata": {}, "weight_map": {k: target for k in keys}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return model


def _keys(file: Path) -> list[str]:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return [k for k in json.loads(f.read(n)) if k != "__metadata__"]


@pytest.mark.parametrize("stream", ["off", "on"])
@pytest.mark.parametrize("kind", KINDS)
def test_prune_refuses(tiny_llama, tmp_path, kind, stream):
    """prune --drop (the copy-only path when streamed) exited 0 with the victim's weights in its output."""
    model = hostile(tiny_llama, tmp_path, kind)
    out = tmp_path / "out"
    refused(invoke("prune", model, "--drop", "1", "--stream", stream, "-o", out), out)


@pytest.mark.parametrize("stream", ["off", "on"])
@pytest.mark.parametrize("kind", ["dotdot-index", "symlinked-weights"])
def test_sparsify_refuses(tiny_llama, calib_file, tmp_path, kind, stream):
    model = hostile(tiny_llama, tmp_path, kind)
    out = tmp_path / "out"
    refused(invoke("sparsify", model, "--method", "magnitude", "--stream", stream, "-o", out), out)


@pytest.mark.parametrize("stream", ["off", "on"])
@pytest.mark.parametrize("kind", ["absolute-index", "symlinked-shard"])
def test_eval_ppl_refuses(tiny_llama, calib_file, tmp_path, kind, stream):
    model = hostile(tiny_llama, tmp_path, kind)
    refused(invoke("eval", model, "--ppl", calib_file, "--stream", stream))


@pytest.mark.parametrize("kind", ["dotdot-index", "symlinked-config"])
@pytest.mark.parametrize("command", ["export", "inspect"])
def test_export_and_inspect_refuse(tiny_llama, tmp_path, kind, command):
    model = hostile(tiny_llama, tmp_path, kind)
    out = tmp_path / "out"
    refused(invoke(command, model, *(["-o", out] if command == "export" else [])), out)


def test_spec_refuses_a_hostile_draft_and_target(tiny_llama, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Tom has 3 pens."}) + "\n")
    for i, kind in enumerate(["dotdot-index", "symlinked-shard"]):
        bad = hostile(tiny_llama, tmp_path / str(i), kind)
        refused(invoke("spec", bad, "--target", tiny_llama, "--prompts", prompts))
        refused(invoke("spec", tiny_llama, "--target", bad, "--prompts", prompts))


def test_distill_refuses_a_hostile_student_and_teacher(tiny_llama, sft_file, tmp_path):
    bad = hostile(tiny_llama, tmp_path, "symlinked-weights")
    out = tmp_path / "out"
    refused(invoke("distill", "train", bad, "--dataset", sft_file, "--max-steps", "1", "-o", out), out)
    refused(invoke("distill", "regenerate", "--teacher", bad, "--dataset", sft_file, "-o", out), out)


def _sparse_export(tiny_llama: Path, root: Path) -> Path:
    from safetensors.torch import load_file, save_file

    dense = root / "dense"
    shutil.copytree(tiny_llama, dense)
    w = load_file(dense / "model.safetensors")
    for k, t in w.items():
        if ".mlp." in k:
            t[..., ::2] = 0
    save_file({k: t.contiguous() for k, t in w.items()}, dense / "model.safetensors", metadata={"format": "pt"})
    out = root / "sparse"
    r = invoke("export", dense, "--format", "sparse", "-o", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("kind", ["dotdot-index", "symlinked-extra-file"])
def test_decompress_and_sparse_load_refuse(tiny_llama, tmp_path, kind):
    """The sparse export is read by draftkit itself (and decompress copies its other files)."""
    sparse = _sparse_export(tiny_llama, tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    secret = victim / "secret.txt"
    secret.write_text("not yours")
    if kind == "dotdot-index":
        shutil.move(sparse / "model.safetensors", victim / "model.safetensors")
        keys = _keys(victim / "model.safetensors")
        index = {"metadata": {}, "weight_map": {k: "../victim/model.safetensors" for k in keys}}
        (sparse / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        (sparse / "notes.txt").symlink_to(secret)
    out = tmp_path / "dense-out"
    refused(invoke("decompress", sparse, "-o", out), out)
    refused(invoke("inspect", sparse))


def test_symlink_loop_among_the_weights_is_one_line(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "model.safetensors").unlink()
    (model / "a.safetensors").symlink_to(model / "b.safetensors")
    (model / "b.safetensors").symlink_to(model / "a.safetensors")
    (model / "model.safetensors").symlink_to(model / "a.safetensors")
    for stream in ("off", "on"):
        r = invoke("prune", model, "--drop", "1", "--stream", stream, "-o", tmp_path / "out")
        assert r.exit_code == EXIT_INVALID_INPUT, r.output
        assert "symlink loop" in r.output and "internal error" not in r.output, r.output


def test_links_inside_the_folder_and_a_linked_folder_are_fine(tiny_llama, tmp_path):
    """What is refused is leaving the folder: a folder reached through a symlink, and links between its
    own files (as hub-cache snapshots have), load as before."""
    from draftkit.checkpoint import load_model, weight_files

    real = tmp_path / "real"
    shutil.copytree(tiny_llama, real)
    (real / "weights").mkdir()
    shutil.move(real / "model.safetensors", real / "weights" / "model.safetensors")
    (real / "model.safetensors").symlink_to(Path("weights") / "model.safetensors")
    linked = tmp_path / "linked"
    linked.symlink_to(real)
    assert weight_files(linked) == [linked / "model.safetensors"]
    assert load_model(str(linked), device="cpu").config.num_hidden_layers == 6


def test_hub_cache_snapshot_links_into_its_blobs_only(tiny_llama, tmp_path, monkeypatch):
    """A hub-cache snapshot's files are links into the repository's blobs: those are inside; an index
    entry leaving the repository's cache folder is not (the streamed path reads hub models from it)."""
    from draftkit.checkpoint import open_checkpoint

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in sorted(tiny_llama.iterdir()):
        if f.is_file():
            shutil.copy(f, repo / "blobs" / f.name)
            (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    assert len(open_checkpoint("someone/tiny").keys()) > 0
    keys = _keys(tiny_llama / "model.safetensors")
    index = {"metadata": {}, "weight_map": {k: "../../../../victim/model.safetensors" for k in keys}}
    (repo / "blobs" / "index").write_text(json.dumps(index))
    (snap / "model.safetensors.index.json").symlink_to(Path("..") / ".." / "blobs" / "index")
    with pytest.raises(ModelLoadError, match="outside the model directory"):
        open_checkpoint("someone/tiny")
    from draftkit.checkpoint import load_model

    with pytest.raises(ModelLoadError, match="restore the checkpoint's own index"):
        load_model("someone/tiny", device="cpu")  # transformers refuses it too, in its words



def test_a_bin_index_is_checked_too(tiny_llama, tmp_path):
    """transformers reads .bin shards through pytorch_model.bin.index.json: its entries are held to the same rule."""
    from draftkit.refs import resolve_model_ref

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: "../victim/pytorch_model.bin" for k in _keys(tiny_llama / "model.safetensors")}}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.index.json names ../victim/pytorch_model.bin, which points outside"):
        resolve_model_ref(str(model))


def test_run_fingerprint_never_reads_through_a_link_out_of_a_subfolder(tiny_llama, tmp_path):
    """`run` hashes every file of its input model: a file in a subfolder that links outside is skipped, not read."""
    from draftkit.fingerprint import content_hash

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "extra").mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"a")
    (model / "extra" / "notes.bin").symlink_to(secret)
    before, followed = content_hash(model, model=True), content_hash(model)
    secret.write_bytes(b"b")  # a change outside the folder does not reach the model's identity
    assert content_hash(model, model=True) == before
    assert content_hash(model) != followed  # (a data folder is hashed as it is, links followed)
