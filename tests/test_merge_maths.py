"""The merge maths as pure tensor functions: SLERP (with its nearly-parallel linear fallback) against the
textbook formula, chunked statistics equal to whole-tensor ones, linear, task arithmetic, the mask rules
and mergekit-style per-tensor t."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from draftkit.merge import maths


def _reference_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """The classic mergekit/numpy formulation, written out independently (float64)."""
    a = v0.double().numpy().ravel()
    b = v1.double().numpy().ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = float(np.sum((a / (na if na > eps else 1)) * (b / (nb if nb > eps else 1))))
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > dot_threshold:
        return torch.from_numpy(((1 - t) * a + t * b).reshape(v0.shape))
    theta_0 = np.arccos(dot)
    s0 = np.sin((1 - t) * theta_0) / np.sin(theta_0)
    s1 = np.sin(t * theta_0) / np.sin(theta_0)
    return torch.from_numpy((s0 * a + s1 * b).reshape(v0.shape))


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_the_formula(t):
    g = torch.Generator().manual_seed(0)
    v0, v1 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    out = maths.slerp(t, v0, v1)
    assert out.dtype == torch.float32 and out.shape == v0.shape
    torch.testing.assert_close(out.double(), _reference_slerp(t, v0, v1), rtol=0, atol=1e-6)


def test_slerp_endpoints_and_orthogonal_midpoint():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(maths.slerp(0.0, e1, e2), e1)
    torch.testing.assert_close(maths.slerp(1.0, e1, e2), e2)
    mid = maths.slerp(0.5, e1, e2)
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    assert abs(float(mid.norm()) - 1.0) < 1e-6  # on the sphere, unlike linear interpolation (norm 0.707)


@pytest.mark.parametrize("scale", [2.0, -3.0])
def test_parallel_vectors_fall_back_to_linear_interpolation(scale):
    v0 = torch.randn(32, generator=torch.Generator().manual_seed(1))
    v1 = scale * v0  # parallel (or antiparallel): sin(theta) = 0, the spherical formula divides by zero
    s0, s1, linear = maths.slerp_coefficients(0.3, *maths.slerp_statistics(v0, v1))
    assert linear and (s0, s1) == (0.7, 0.3)
    out = maths.slerp(0.3, v0, v1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 0.7 * v0 + 0.3 * v1)


def test_nearly_parallel_threshold():
    g = torch.Generator().manual_seed(2)
    v0 = torch.randn(1000, generator=g)
    close = v0 + 1e-3 * torch.randn(1000, generator=g)  # cos ~ 1 - 5e-7: above 0.9995
    far = v0 + 0.2 * torch.randn(1000, generator=g)  # cos ~ 0.98: spherical
    assert maths.slerp_coefficients(0.5, *maths.slerp_statistics(v0, close))[2]
    assert not maths.slerp_coefficients(0.5, *maths.slerp_statistics(v0, far))[2]


def test_zero_vector_is_finite():
    out = maths.slerp(0.5, torch.zeros(4), torch.ones(4))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _reference_slerp(0.5, torch.zeros(4), torch.ones(4)), rtol=0, atol=1e-7)


def test_statistics_add_up_over_row_chunks():
    g = torch.Generator().manual_seed(3)
    v0, v1 = torch.randn(50, 7, generator=g), torch.randn(50, 7, generator=g)
    whole = maths.slerp_statistics(v0, v1)
    parts = [maths.slerp_statistics(v0[a:a + 16], v1[a:a + 16]) for a in range(0, 50, 16)]
    summed = tuple(sum(p[i] for p in parts) for i in range(3))
    assert all(abs(x - y) < 1e-5 * max(1.0, abs(x)) for x, y in zip(whole, summed, strict=True))
    s0, s1, _ = maths.slerp_coefficients(0.4, *summed)
    chunked = torch.cat([maths.combine([v0[a:a + 16], v1[a:a + 16]], [s0, s1]) for a in range(0, 50, 16)])
    torch.testing.assert_close(chunked, maths.slerp(0.4, v0, v1), rtol=0, atol=0)


def test_bfloat16_inputs_are_merged_in_float32():
    g = torch.Generator().manual_seed(4)
    v0, v1 = torch.randn(64, generator=g).bfloat16(), torch.randn(64, generator=g).bfloat16()
    out = maths.slerp(0.5, v0, v1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference_slerp(0.5, v0.float(), v1.float()), rtol=0, atol=1e-6)


def test_linear_normalises_weights():
    a, b, c = torch.full((3,), 1.0), torch.full((3,), 2.0), torch.full((3,), 4.0)
    torch.testing.assert_close(maths.linear([a, b, c], [1, 1, 2]), torch.full((3,), (1 + 2 + 8) / 4))
    torch.testing.assert_close(maths.linear([a, b], [0.5, 0.5]), maths.slerp(0.5, a, b))  # parallel -> same
    with pytest.raises(ValueError):
        maths.linear([a, b], [1, -1])


def test_task_arithmetic():
    g = torch.Generator().manual_seed(5)
    base, x, y = (torch.randn(10, generator=g) for _ in range(3))
    out = maths.task_arithmetic([x, y], base, [0.7, 0.4])
    torch.testing.assert_close(out, base + 0.7 * (x - base) + 0.4 * (y - base))
    # weights 1/n: the task vectors averaged, i.e. the linear average of the inputs
    torch.testing.assert_close(maths.task_arithmetic([x, y], base, [0.5, 0.5]), maths.linear([x, y], [1, 1]))


def test_mask_rules():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    assert torch.equal(maths.merge_keep_masks([a, a.clone()], None), a)  # identical: that mask, no rule needed
    with pytest.raises(ValueError, match="differ"):
        maths.merge_keep_masks([a, b], None)
    assert maths.merge_keep_masks([a, b], "intersect").tolist() == [True, False, False, False]
    assert maths.merge_keep_masks([a, b], "union").tolist() == [True, True, True, False]
    assert maths.merge_keep_masks([a, b], "first").tolist() == a.tolist()


def test_t_per_tensor_kind_and_gradient():
    filters = [maths.parse_t_filter("self_attn=0.2"), maths.parse_t_filter("mlp=0:1"), maths.parse_t_filter("*=0.9")]
    assert maths.resolve_t("model.layers.3.self_attn.q_proj.weight", 0.5, filters, 3, 5) == 0.2
    assert maths.resolve_t("model.layers.0.mlp.up_proj.weight", 0.5, filters, 0, 5) == 0.0
    assert maths.resolve_t("model.layers.2.mlp.up_proj.weight", 0.5, filters, 2, 5) == 0.5
    assert maths.resolve_t("model.layers.4.mlp.up_proj.weight", 0.5, filters, 4, 5) == 1.0
    assert maths.resolve_t("model.norm.weight", 0.5, filters, None, 5) == 0.9
    assert maths.resolve_t("model.norm.weight", 0.5, filters[:2], None, 5) == 0.5
    assert maths.gradient_value([0.0, 0.5, 1.0], 0.25) == 0.25
    for bad in ("mlp", "mlp=x", "mlp=1.5", "=0.3"):
        with pytest.raises(ValueError):
            maths.parse_t_filter(bad)
