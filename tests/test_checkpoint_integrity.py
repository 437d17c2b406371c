"""#22: a checkpoint that disagrees with its config, or a weight file that is broken or tampered with, is one
line (exit 2) naming the file or the tensors and the fix, in the resident and the streamed paths; never an
invented or silently dropped layer, a float32 guess, or an internal error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.errors import EXIT_INVALID_INPUT, ModelLoadError
from tests._helpers_distill import sft_file
from tests.conftest import make_tied_llama, make_tiny_model

FIXTURES = (sft_file,)  # pytest finds fixtures by name in this module
STREAMS = ["off", "on"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result, *needles) -> str:
    assert result.exit_code == EXIT_INVALID_INPUT, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return make_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("four") / "llama", layers=4)


def with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def with_tensors(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    w = load_file(dst / "model.safetensors")
    change(w)
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ---- the checkpoint against its config ------------------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS)
def test_config_with_more_layers_than_the_checkpoint(four_layers, tmp_path, stream):
    """num_hidden_layers 6 over tensors for 4: prune used to write 5 layers, some newly initialised."""
    model = with_config(four_layers, tmp_path / "m", num_hidden_layers=6)
    out = tmp_path / "out"
    one_line(invoke("prune", model, "--drop", "1", "--stream", stream, "-o", out),
             "num_hidden_layers: 6", "layers 4, 5", "lacks", "model.layers.4.")
    assert not out.exists()


@pytest.mark.parametrize("stream", STREAMS)
def test_config_with_fewer_layers_than_the_checkpoint(four_layers, tmp_path, stream):
    """num_hidden_layers 3 over tensors for 4: sparsify used to drop the fourth without a word."""
    model = with_config(four_layers, tmp_path / "m", num_hidden_layers=3)
    out = tmp_path / "out"
    one_line(invoke("sparsify", model, "--method", "magnitude", "--stream", stream, "-o", out),
             "num_hidden_layers: 3", "layers 3", "does not use", "model.layers.3.")
    assert not out.exists()


@pytest.mark.parametrize("stream", STREAMS)
def test_an_untied_head_missing_from_the_checkpoint(four_layers, tmp_path, stream):
    """tie_word_embeddings false and no lm_head.weight: transformers would draw a random head."""
    model = with_tensors(four_layers, tmp_path / "m", lambda w: w.pop("lm_head.weight"))
    one_line(invoke("prune", model, "--drop", "1", "--stream", stream, "-o", tmp_path / "out"), "lm_head.weight", "lacks")


@pytest.mark.parametrize("stream", STREAMS)
def test_what_transformers_documents_is_allowed(tiny_tokenizer_dir, tmp_path, stream):
    """A tied head stored once under the embeddings' key, and rotary frequencies old checkpoints carry."""
    tied = make_tied_llama(tiny_tokenizer_dir, tmp_path / "tied", layers=4)

    def add_rotary(w):
        w["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    model = with_tensors(tied, tmp_path / "m", add_rotary)
    r = invoke("prune", model, "--drop", "1", "--stream", stream, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


def test_an_unbuildable_config_is_not_skipped_silently(four_layers, tmp_path):
    """check_tensor_shapes returned silently on any exception; a config no model can be built from is an error."""
    from draftkit.checkpoint import check_tensor_shapes, load_config

    model = with_config(four_layers, tmp_path / "m", hidden_act="no-such-activation")
    with pytest.raises(ModelLoadError, match="config.json describes no model"):
        check_tensor_shapes([model / "model.safetensors"], load_config(str(model)))


@pytest.mark.parametrize("stream", STREAMS)
def test_a_vocabulary_of_2_to_the_40(four_layers, tmp_path, stream):
    model = with_config(four_layers, tmp_path / "m", vocab_size=2**40)
    one_line(invoke("prune", model, "--drop", "1", "--stream", stream, "-o", tmp_path / "out"),
             "config.json describes no model", "restore the checkpoint's own config.json")


# ---- broken weight files --------------------------------------------------------------------------


def _header(raw: bytes) -> tuple[int, dict]:
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


def _with_header(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return len(hb).to_bytes(8, "little") + hb + data


def _truncated(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def _header_larger_than_file(raw: bytes) -> bytes:
    return (len(raw) * 4).to_bytes(8, "little") + raw[8:]


def _tensor_beyond_the_end(raw: bytes) -> bytes:
    n, header = _header(raw)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin, end + 4096]  # its shape says no more; the file ends before it does
    return _with_header(header, raw[8 + n :])


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("damage", [_truncated, _header_larger_than_file, _tensor_beyond_the_end])
def test_a_broken_safetensors_file_is_one_line(four_layers, tmp_path, damage, stream):
    model = tmp_path / "m"
    shutil.copytree(four_layers, model)
    f = model / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    one_line(invoke("prune", model, "--drop", "1", "--stream", stream, "-o", tmp_path / "out"),
             str(f), "not a readable safetensors file", "download it again")


def test_a_dtype_torch_cannot_hold_is_refused_never_float32(tmp_path):
    from draftkit.checkpoint import LazyCheckpoint

    (tmp_path / "u16").mkdir()
    save_file({"x": torch.zeros(4, dtype=torch.uint16)}, tmp_path / "u16" / "model.safetensors")
    assert LazyCheckpoint(tmp_path / "u16").dtype["x"] == torch.uint16  # was float32
    (tmp_path / "f6").mkdir()
    (tmp_path / "f6" / "model.safetensors").write_bytes(
        _with_header({"x": {"dtype": "F6_E2M3", "shape": [8], "data_offsets": [0, 6]}}, bytes(6)))
    with pytest.raises(ModelLoadError, match="stored as F6_E2M3"):
        LazyCheckpoint(tmp_path / "f6")


# ---- draftkit's sparse export, tampered with -------------------------------------------------------

MODULE = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def sparse_export(four_layers, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sparse")
    dense = root / "dense"
    shutil.copytree(four_layers, dense)
    w = load_file(dense / "model.safetensors")
    for k, t in w.items():
        if ".mlp." in k:
            t[..., ::2] = 0
    save_file(w, dense / "model.safetensors", metadata={"format": "pt"})
    r = invoke("export", dense, "--format", "sparse", "-o", root / "sparse")
    assert r.exit_code == 0, r.output
    return root / "sparse"


def _shape_bomb(w):
    w[f"{MODULE}.shape"] = torch.tensor([2**31, 2**31])


def _more_marks_than_values(w):
    b = w[f"{MODULE}.bitmask"].clone()
    b[:2, 0] = 255
    w[f"{MODULE}.bitmask"] = b


def _values_cut_short(w):
    w[f"{MODULE}.compressed"] = w[f"{MODULE}.compressed"][:-5].clone()


def _no_shape(w):
    w.pop(f"{MODULE}.shape")


@pytest.mark.parametrize("tamper", [_shape_bomb, _more_marks_than_values, _values_cut_short, _no_shape])
def test_a_tampered_sparse_export_is_one_line(sparse_export, tmp_path, tamper):
    model = with_tensors(sparse_export, tmp_path / "m", tamper)
    for args in (["decompress", model, "-o", tmp_path / "out"], ["inspect", model],
                 ["prune", model, "--drop", "1", "--stream", "on", "-o", tmp_path / "out"]):
        one_line(invoke(*args), MODULE, "damaged or was altered", "export it again")
    assert not (tmp_path / "out").exists()


# ---- a distill resume checkpoint whose pickled state is corrupt -------------------------------------


def test_a_corrupt_resume_checkpoint_is_one_line(tiny_llama, sft_file, tmp_path, monkeypatch):
    from tests.test_distill_train import _cfg, _die_in_epoch_2, _load, load_examples, train_mod, train_model

    cfg = _cfg(sft_file, epochs=2, checkpoints=True)
    examples = load_examples(cfg)
    real = _die_in_epoch_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_model(*_load(tiny_llama), examples, cfg, tmp_path / "ckpt")
    monkeypatch.setattr(train_mod, "response_loss", real)
    saved = tmp_path / "ckpt" / "epoch-1"
    pickles = [f for f in saved.iterdir() if f.suffix in (".bin", ".pkl", ".pt")]
    assert pickles
    for f in pickles:
        f.write_bytes(b"\x80\x04not a pickle at all" + bytes(64))
    with pytest.raises(ModelLoadError, match=f"{saved} is not a readable training checkpoint.*delete {saved}"):
        train_model(*_load(tiny_llama), examples, cfg, tmp_path / "ckpt")


@pytest.mark.parametrize("depth", [100_000, 500])  # beyond Python's recursion limit, and parseable but absurd
def test_a_deeply_nested_draftkit_json_is_one_line(four_layers, tmp_path, depth):
    model = tmp_path / "m"
    shutil.copytree(four_layers, model)
    (model / "draftkit.json").write_text("[" * depth + "]" * depth)
    for args in (["inspect", model], ["prune", model, "--drop", "1", "-o", tmp_path / "out"]):
        one_line(invoke(*args), str(model / "draftkit.json"), "nested", "delete it")
    assert not (tmp_path / "out").exists()


def test_a_deeply_nested_config_json_is_one_line(four_layers, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(four_layers, model)
    cfg = (model / "config.json").read_text()
    (model / "config.json").write_text(cfg.rstrip().rstrip("}") + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    for stream in STREAMS:
        one_line(invoke("prune", model, "--drop", "1", "--stream", stream, "-o", tmp_path / "out"),
                 str(model), "nested too deeply", "restore")
