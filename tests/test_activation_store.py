"""Activations that wait on another device than the one the layers run on (a streamed run whose activations do
not fit on the GPU keeps them on the CPU): the prune scoring and the captured first-layer inputs follow the
store. A CPU-only machine has one real device, so the compute device is a fake CUDA one (torch's
FakeTensorMode checks devices exactly as real tensors do, without memory or kernels)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from draftkit.engine.forward import capture_layer_inputs
from draftkit.engine.layers import ResidentLayers
from draftkit.prune.runner import collect_layer_states

fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")
CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(8, 8)

    def forward(self, h, **kw):
        return h + self.mlp(h)


class _Decoder(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.embed_tokens = nn.Embedding(20, 8)
        self.layers = nn.ModuleList(_Block() for _ in range(n))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=attention_mask)
        return h


class _LM(nn.Module):
    """The smallest decoder-only LM layout draftkit walks (``model.layers``, a config with the layer count)."""

    def __init__(self, n=3):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=n)
        self.model = _Decoder(n)


def _on_fake_cuda(model: nn.Module, mode) -> nn.Module:
    for mod in model.modules():
        for k, p in list(mod._parameters.items()):
            mod._parameters[k] = nn.Parameter(fake_tensor.FakeTensor(mode, p.detach().to("meta"), CUDA), requires_grad=False)
    return model


def test_captured_first_layer_inputs_wait_on_the_store():
    mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
    model = _on_fake_cuda(_LM(), mode)
    with mode:
        inputs = capture_layer_inputs(model, [torch.randint(0, 20, (2, 5)) for _ in range(3)], device=CUDA, store=CPU)
        assert [h.device for h in inputs.hidden] == [CPU] * 3
        assert capture_layer_inputs(model, [torch.randint(0, 20, (2, 5))], device=CUDA).hidden[0].device == CUDA


def test_block_scores_with_activations_stored_on_the_cpu():
    """Layers on the GPU, activations between layers on the CPU: every layer's input meets its output on the GPU."""
    mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
    model = _on_fake_cuda(_LM(), mode)
    source = ResidentLayers(model)
    source.store = CPU
    with mode:
        states, bi = collect_layer_states(model, [torch.randint(0, 20, (6,)) for _ in range(4)], source=source)
    assert tuple(states.shape) == (4, 3 + 1, 8) and tuple(bi.shape) == (3,)
