"""``draftkit merge`` on tiny checkpoints: each tensor equals the maths on the inputs' tensors, chunked
reads give the same bytes, architectures are checked, sparsity masks survive (identical masks exactly;
different masks refused unless a rule is chosen), and a sparse merge exports as sparse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.merge import maths
from tests.conftest import make_tiny_model


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _merge(*args: str, code: int = 0):
    """The JSON report of a merge that succeeds; the error output (stderr) of one that fails."""
    r = CliRunner().invoke(app, ["merge", *args, "--json", "-q"])
    assert r.exit_code == code, r.output
    return json.loads(r.stdout) if code == 0 else r.stderr


@pytest.fixture(scope="module")
def students(tiny_tokenizer_dir, tmp_path_factory):
    """Three tiny Llamas of one architecture (different seeds) and a fourth as the base."""
    root = tmp_path_factory.mktemp("students")
    return [make_tiny_model("llama", tiny_tokenizer_dir, root / f"m{i}", layers=3, seed=i) for i in range(4)]


def _sparsify(src: Path, out: Path, keeps: dict[str, torch.Tensor]) -> Path:
    """A copy of ``src`` whose decoder linears are zero outside ``keeps`` (True = kept)."""
    import shutil

    shutil.copytree(src, out)
    w = _weights(src)
    for k, keep in keeps.items():
        w[k] = w[k] * keep
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _masks(model: Path, seed: int, sparsity: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) >= sparsity for k, v in _weights(model).items()
            if ".layers." in k and v.dim() == 2}


def test_slerp_equals_the_maths_per_tensor(students, tmp_path):
    a, b = students[:2]
    report = _merge(str(a), str(b), "--method", "slerp", "--t", "0.3", "-o", str(tmp_path / "m"))
    wa, wb, wm = _weights(a), _weights(b), _weights(tmp_path / "m")
    assert wm.keys() == wa.keys()
    for k in wa:
        torch.testing.assert_close(wm[k], maths.slerp(0.3, wa[k], wb[k]).to(wa[k].dtype), rtol=0, atol=1e-6)
    assert report["method"] == "slerp" and report["t"] == 0.3
    norms = [k for k in wa if k.endswith("norm.weight")]  # all ones in both: parallel, linear interpolation
    assert set(norms) <= set(report["parallel_fallback_tensors"]) or report["parallel_fallback"] >= len(norms)
    # a loadable model with the first input's config and tokenizer, and provenance naming every input
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    prov = json.loads((tmp_path / "m" / "draftkit.json").read_text())
    assert prov["stage"] == "merge" and [i["model"] for i in prov["inputs"]] == [str(a), str(b)]
    assert prov["arguments"]["config"]["t"] == 0.3
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()


def test_t_per_tensor_kind(students, tmp_path):
    a, b = students[:2]
    _merge(str(a), str(b), "--t-filters", "self_attn=0.1,mlp=0:1", "--t", "0.6", "-o", str(tmp_path / "m"))
    wa, wb, wm = _weights(a), _weights(b), _weights(tmp_path / "m")
    for k, t in [("model.layers.1.self_attn.q_proj.weight", 0.1), ("model.layers.0.mlp.up_proj.weight", 0.0),
                 ("model.layers.1.mlp.up_proj.weight", 0.5), ("model.layers.2.mlp.up_proj.weight", 1.0),
                 ("model.embed_tokens.weight", 0.6)]:
        torch.testing.assert_close(wm[k], maths.slerp(t, wa[k], wb[k]), rtol=0, atol=1e-6)


def test_chunked_reads_give_the_same_merge(students, tmp_path, monkeypatch):
    from draftkit.merge import runner

    a, b = students[:2]
    _merge(str(a), str(b), "-o", str(tmp_path / "whole"))
    monkeypatch.setattr(runner, "CHUNK_ELEMENTS", 100)  # every tensor in many row chunks
    _merge(str(a), str(b), "-o", str(tmp_path / "chunked"))
    whole, chunked = _weights(tmp_path / "whole"), _weights(tmp_path / "chunked")
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_linear_and_task_arithmetic(students, tmp_path):
    a, b, c, base = students
    _merge(str(a), str(b), str(c), "--method", "linear", "--weights", "2,1,1", "-o", str(tmp_path / "lin"))
    w = [_weights(m) for m in (a, b, c)]
    wl = _weights(tmp_path / "lin")
    for k in wl:
        torch.testing.assert_close(wl[k], (2 * w[0][k] + w[1][k] + w[2][k]) / 4, rtol=0, atol=1e-6)
    report = _merge(str(a), str(b), "--method", "task-arithmetic", "--base", str(base), "-o", str(tmp_path / "ta"))
    assert report["weights"] == [1.0, 1.0] and report["base"] == str(base)
    wb, wt = _weights(base), _weights(tmp_path / "ta")
    for k in wt:
        torch.testing.assert_close(wt[k], wb[k] + (w[0][k] - wb[k]) + (w[1][k] - wb[k]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--method", "slerp", "X3"], "slerp merges exactly two models"),
    (["--method", "task-arithmetic"], "task-arithmetic needs base"),
    (["--weights", "1,2"], "weights are for linear and task-arithmetic"),
    (["--method", "linear", "--weights", "1,2,3"], "weights has 3 values for 2 models"),
    (["--t-filters", "mlp"], "FILTER=VALUE"),
])
def test_bad_settings_are_one_line(students, tmp_path, args, message):
    a, b, c, _ = students
    extra = [str(c) if x == "X3" else x for x in args]
    models = [str(a), str(b)] + ([extra.pop()] if "X3" in args else [])
    out = _merge(*models, *extra, "-o", str(tmp_path / "o"), code=2)
    assert len(out.strip().splitlines()) == 1 and message in out, out
    assert not (tmp_path / "o").exists()


def test_architecture_mismatch_names_the_first_tensor(students, tiny_models, tiny_tokenizer_dir, tmp_path):
    a = students[0]
    out = _merge(str(a), str(tiny_models["qwen2"]), "-o", str(tmp_path / "o"), code=2)
    assert "qwen2 model" in out and "llama model" in out and len(out.strip().splitlines()) == 1
    deeper = make_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "deeper", layers=4)
    out = _merge(str(a), str(deeper), "-o", str(tmp_path / "o"), code=2)
    assert "model.layers.3." in out and "which" in out
    wider = tmp_path / "wider"
    wider.mkdir()
    cfg = json.loads((a / "config.json").read_text())
    cfg["intermediate_size"] = 96
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
                     ).save_pretrained(wider)
    for f in a.glob("tokenizer*"):
        (wider / f.name).write_bytes(f.read_bytes())
    out = _merge(str(a), str(wider), "-o", str(tmp_path / "o"), code=2)
    assert "model.layers.0.mlp.down_proj.weight is [64, 96]" in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_identical_masks_are_kept_exactly(students, tmp_path):
    keeps = _masks(students[0], seed=7)
    sa = _sparsify(students[0], tmp_path / "sa", keeps)
    sb = _sparsify(students[1], tmp_path / "sb", keeps)
    for method in ("slerp", "linear"):
        report = _merge(str(sa), str(sb), "--method", method, "-o", str(tmp_path / method))
        w = _weights(tmp_path / method)
        for k, keep in keeps.items():
            assert torch.equal(w[k] != 0, keep), k  # the zeros are exactly the inputs' zeros
        assert report["sparse_tensors"] == len(keeps) and report["tensors_with_different_masks"] == 0
        assert len(report["layer_sparsity"]) == 3 and all(0.45 < s < 0.55 for s in report["layer_sparsity"])
        assert abs(report["sparsity"] - report["input_sparsity"][0]) < 1e-9
    # task arithmetic against a dense base would fill the zeros in: the shared mask is applied
    _merge(str(sa), str(sb), "--method", "task-arithmetic", "--base", str(students[3]), "--weights", "0.5,0.5",
           "-o", str(tmp_path / "ta"))
    w = _weights(tmp_path / "ta")
    assert all(torch.equal(w[k] != 0, keep) for k, keep in keeps.items())


def test_different_masks_need_a_rule(students, tmp_path):
    ka, kb = _masks(students[0], seed=7), _masks(students[0], seed=8)
    sa = _sparsify(students[0], tmp_path / "sa", ka)
    sb = _sparsify(students[1], tmp_path / "sb", kb)
    out = _merge(str(sa), str(sb), "-o", str(tmp_path / "o"), code=2)
    assert len(out.strip().splitlines()) == 1 and "--masks" in out and "masks differ" in out
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
    expected = {"intersect": lambda a, b: a & b, "union": lambda a, b: a | b, "first": lambda a, b: a}
    for rule, fn in expected.items():
        report = _merge(str(sa), str(sb), "--masks", rule, "-o", str(tmp_path / rule))
        w = _weights(tmp_path / rule)
        for k in ka:
            assert torch.equal(w[k] != 0, fn(ka[k], kb[k])), (rule, k)
        assert report["tensors_with_different_masks"] == len(ka)
    assert _merge(str(sa), str(sb), "--masks", "intersect", "-o", str(tmp_path / "i2"))["sparsity"] > 0.7
    # a dense model merged with a sparse one: the masks differ too
    out = _merge(str(sa), str(students[1]), "-o", str(tmp_path / "o"), code=2)
    assert "masks differ" in out


def test_sparse_merge_exports_as_sparse_and_sparse_exports_merge(students, tmp_path):
    keeps = _masks(students[0], seed=7)
    sa = _sparsify(students[0], tmp_path / "sa", keeps)
    sb = _sparsify(students[1], tmp_path / "sb", keeps)
    _merge(str(sa), str(sb), "-o", str(tmp_path / "m"))
    r = CliRunner().invoke(app, ["export", str(tmp_path / "m"), "--format", "sparse", "-o", str(tmp_path / "e"),
                                 "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["compressed_modules"] == len(keeps)
    # a sparse-bitmask export is read (decompressed) as an input too; the merge is written dense
    for src, dst in ((sa, "ea"), (sb, "eb")):
        r = CliRunner().invoke(app, ["export", str(src), "--format", "sparse", "-o", str(tmp_path / dst), "-q"])
        assert r.exit_code == 0, r.output
    _merge(str(tmp_path / "ea"), str(tmp_path / "eb"), "-o", str(tmp_path / "m2"))
    m, m2 = _weights(tmp_path / "m"), _weights(tmp_path / "m2")
    assert m.keys() == m2.keys() and all(torch.equal(m[k], m2[k]) for k in m)
    assert "quantization_config" not in json.loads((tmp_path / "m2" / "config.json").read_text())


def test_output_dtype_follows_load_dtype(students, tmp_path):
    a, b = students[:2]
    _merge(str(a), str(b), "--dtype", "bfloat16", "-o", str(tmp_path / "m"))
    w = _weights(tmp_path / "m")
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
