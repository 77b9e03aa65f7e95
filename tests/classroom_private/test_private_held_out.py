"""Held-out cases of some exercises (teacher only: the student edition leaves this folder out)."""

import math

import pytest
import torch

from minimoe.balance import capacity_keep_mask
from minimoe.fp8 import quantize_act_1x128
from minimoe.router import select_experts


@pytest.mark.exercise("group-limited-routing", points=2)
def test_one_kept_group_limits_every_choice_to_it():
    scores = torch.tensor([[-5.0, -4.0, -0.1, -0.2, -3.0, -3.0]])  # 3 groups of 2
    bias = torch.tensor([0.0, 0.0, -1.0, -1.0, 0.0, 0.0])  # group 1 loses by the bias
    idx = select_experts(scores, 2, bias=bias, n_group=3, topk_group=1, group_score="top2_sum")
    # biased group sums: -9, -2.3, -6 -> group 1 (experts 2, 3) although biased scores < 0
    assert sorted(idx[0].tolist()) == [2, 3]


@pytest.mark.exercise("capacity-dropping", points=3)
def test_ties_keep_slot_order_and_large_factor_drops_nothing():
    topk_idx = torch.tensor([[0, 1], [0, 1], [0, 1]])
    topk_weight = torch.full((3, 2), 0.5)  # ties: slot 0 ranks first
    keep = capacity_keep_mask(topk_idx, topk_weight, n_experts=2, capacity_factor=2 / 3)
    # C = ceil(2/3 * 6 / 2) = 2: expert 0 keeps t0, t1 (rank 0); expert 1 keeps t0, t1 (rank 1)
    assert keep.tolist() == [[True, True], [True, True], [False, False]]
    assert capacity_keep_mask(topk_idx, topk_weight, 2, 10.0).all()


@pytest.mark.exercise("fp8-act-quant", points=2)
def test_zero_tile_and_transposed_input():
    x = torch.zeros(2, 256)
    x[1, 128:] = torch.linspace(-3, 3, 128)
    q, scale = quantize_act_1x128(x.t().contiguous().t())  # a non-contiguous view
    assert scale[0, 0].item() == pytest.approx(1e-4 / 448)  # the amax floor, no division by 0
    assert scale[1, 1].item() == pytest.approx(3 / 448)
    assert q[0].float().abs().sum() == 0
    assert math.isclose(q[1, -1].float().item() * scale[1, 1].item(), 3.0, rel_tol=1e-6)
