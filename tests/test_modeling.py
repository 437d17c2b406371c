import pytest

from draftkit.atomic import atomic_dir
from draftkit.checkpoint import load_model, load_model_and_tokenizer
from draftkit.errors import ModelLoadError, UnsupportedModelError
from draftkit.modeling import decoder_layers, final_norm
from draftkit.refs import ALIASES, resolve_model_ref
from tests.conftest import ARCHS


def test_aliases_resolve_to_hub_ids():
    ref = resolve_model_ref("llama-3.1-8b")
    assert ref.location == ALIASES["llama-3.1-8b"] and not ref.local
    assert resolve_model_ref("Qwen/Qwen2.5-0.5B").location == "Qwen/Qwen2.5-0.5B"


def test_unknown_name_lists_close_aliases():
    with pytest.raises(ModelLoadError, match="qwen2.5-0.5b"):
        resolve_model_ref("qwen2.5-0.5")
    with pytest.raises(ModelLoadError, match="no such model directory"):
        resolve_model_ref("./missing/model")


def test_hub_failure_is_one_clear_error():
    # The hub is unreachable here (HF_HUB_OFFLINE=1 in tests): the message must say so, not a stack.
    with pytest.raises(ModelLoadError, match="from the hub"):
        load_model("draftkit-test/definitely-not-a-model")


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_and_final_norm(arch, tiny_models):
    model, tok = load_model_and_tokenizer(str(tiny_models[arch]))
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers == 6
    assert type(layers[0]).__name__.endswith("DecoderLayer")
    assert "Norm" in type(final_norm(model)).__name__
    assert tok.chat_template


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_choice(dtype, tiny_llama):
    model = load_model(str(tiny_llama), dtype=dtype)
    assert str(next(model.parameters()).dtype) == f"torch.{dtype}"


def test_unsupported_model_error_names_type():
    import torch

    class Odd(torch.nn.Module):
        class config:  # noqa: N801
            model_type = "oddformer"
            num_hidden_layers = 2

    with pytest.raises(UnsupportedModelError, match="oddformer"):
        decoder_layers(Odd())


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
