import math

import pytest
import torch

from draftkit.prune.scores import (
    angular_distance,
    block_distances,
    choose_block,
    lowest_influence,
    parse_layer_ranges,
)


def test_angular_distance_hand_computed():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [-2.0, 0.0], [3.0, 3.0]])
    # 90 degrees -> 0.5, 180 degrees -> 1, same direction -> 0
    assert angular_distance(a, b).tolist() == pytest.approx([0.5, 1.0, 0.0], abs=1e-7)
    # 60 degrees -> 1/3
    c = torch.tensor([1.0, 0.0])
    d = torch.tensor([0.5, math.sqrt(3) / 2])
    assert float(angular_distance(c, d)) == pytest.approx(1 / 3, abs=1e-7)


def test_block_distances_and_choice():
    # 2 samples, 4 layers -> 5 boundary states; layers 1-2 barely change the state.
    e = torch.eye(3)
    s0 = torch.stack([e[0], e[1], e[1] + 0.01 * e[2], e[1] + 0.02 * e[2], e[2]])
    states = torch.stack([s0, 2 * s0])
    d = block_distances(states, 2)
    assert d.shape == (3,)
    # block starting at 1 spans x_1 -> x_3, nearly parallel
    assert choose_block(d) == 1
    assert float(d[0]) == pytest.approx(float(angular_distance(e[0], e[1] + 0.02 * e[2])), abs=1e-6)
    with pytest.raises(ValueError):
        block_distances(states, 5)


def test_lowest_influence_not_contiguous():
    bi = torch.tensor([0.9, 0.1, 0.8, 0.05, 0.7])
    assert lowest_influence(bi, 2) == [1, 3]


def test_parse_layer_ranges():
    assert parse_layer_ranges("20-25") == [20, 21, 22, 23, 24, 25]
    assert parse_layer_ranges("3,5,7-9") == [3, 5, 7, 8, 9]
    with pytest.raises(ValueError):
        parse_layer_ranges("9-7")
