"""Tests for minimoe.balance: losses, the bias update, capacity and statistics."""

import math

import pytest
import torch

from minimoe.balance import (
    capacity_keep_mask,
    expert_capacity,
    router_stats,
    router_z_loss,
    sequence_aux_loss,
    switch_aux_loss,
    update_expert_bias,
)
from minimoe.router import select_experts


def random_topk(n_tokens, n_experts, k, generator):
    """k distinct experts per token."""
    rows = [torch.randperm(n_experts, generator=generator)[:k] for _ in range(n_tokens)]
    return torch.stack(rows)  # (N, k)


# ---------------------------------------------------------------------------------------------
# Switch / GShard auxiliary loss
# ---------------------------------------------------------------------------------------------

def test_switch_loss_is_one_for_uniform_routing():
    E, k = 4, 2
    topk_idx = torch.tensor([[0, 1], [2, 3]] * 4)  # every expert gets 4 of the 16 slots
    probs = torch.full((8, E), 1 / E)
    assert switch_aux_loss(probs, topk_idx).item() == pytest.approx(1.0)


def test_switch_loss_is_larger_for_collapsed_routing():
    E = 4
    # k = 1, every token to expert 0 with probability 1: f_0 = P_0 = 1 -> L = E
    probs = torch.zeros(8, E)
    probs[:, 0] = 1.0
    assert switch_aux_loss(probs, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(E)
    # k = 2 onto experts {0, 1} with probability 1/2 each: L = E * (1/2 * 1/2 * 2) = E / 2
    probs = torch.zeros(8, E)
    probs[:, :2] = 0.5
    topk_idx = torch.tensor([[0, 1]] * 8)
    assert switch_aux_loss(probs, topk_idx).item() == pytest.approx(E / 2)


def test_switch_loss_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    N, E, k = 13, 6, 3
    probs = torch.randn(N, E, generator=generator).softmax(-1)
    topk_idx = random_topk(N, E, k, generator)
    total = 0.0
    for i in range(E):
        slots_to_i = sum(1 for t in range(N) for j in range(k) if topk_idx[t, j].item() == i)
        mean_prob_i = sum(probs[t, i].item() for t in range(N)) / N
        total += (slots_to_i / (N * k)) * mean_prob_i
    assert switch_aux_loss(probs, topk_idx).item() == pytest.approx(E * total, rel=1e-6)


def test_switch_loss_gradient_goes_through_probs():
    generator = torch.Generator().manual_seed(1)
    N, E, k = 10, 5, 2
    probs = torch.rand(N, E, generator=generator).requires_grad_()
    topk_idx = random_topk(N, E, k, generator)
    switch_aux_loss(probs, topk_idx).backward()
    counts = torch.tensor([float((topk_idx == i).sum()) for i in range(E)])
    expected = (E * counts / (N * k) / N).expand(N, E)  # dL/dp_{t,i} = E f_i / N
    torch.testing.assert_close(probs.grad, expected)


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3 sequence-wise auxiliary loss
# ---------------------------------------------------------------------------------------------

def test_sequence_loss_matches_a_loop_over_sequences():
    generator = torch.Generator().manual_seed(2)
    B, T, E, k = 3, 7, 8, 2
    scores = torch.rand(B, T, E, generator=generator)  # sigmoid-like: not normalised
    topk_idx = torch.stack([random_topk(T, E, k, generator) for _ in range(B)])  # (B, T, k)
    per_sequence = []
    for b in range(B):
        total = 0.0
        for i in range(E):
            count = sum(1 for t in range(T) for j in range(k) if topk_idx[b, t, j].item() == i)
            f_i = E / (k * T) * count  # Eq. 18
            p_i = sum(scores[b, t, i].item() / scores[b, t].sum().item() for t in range(T)) / T  # Eq. 19-20
            total += f_i * p_i  # Eq. 17 without alpha
        per_sequence.append(total)
    expected = sum(per_sequence) / B
    assert sequence_aux_loss(scores, topk_idx).item() == pytest.approx(expected, rel=1e-5)


def test_sequence_loss_uniform_is_one_and_scale_invariant():
    T, E, k = 8, 4, 2
    topk_idx = torch.tensor([[0, 1], [2, 3]] * 4).unsqueeze(0)  # (1, T, k)
    scores = torch.full((1, T, E), 0.3)  # uniform sigmoid scores: normalised to 1/E
    assert sequence_aux_loss(scores, topk_idx).item() == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(2, T, E, generator=generator)
    topk_idx = torch.stack([random_topk(T, E, k, generator) for _ in range(2)])
    torch.testing.assert_close(sequence_aux_loss(scores, topk_idx), sequence_aux_loss(3 * scores, topk_idx))


# ---------------------------------------------------------------------------------------------
# z-loss
# ---------------------------------------------------------------------------------------------

def test_z_loss_hand_case():
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4 = 2 ln 2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2) ** 2 + (2 * math.log(2)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_z_loss_formula_on_random_logits():
    generator = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(5, 7, generator=generator)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 5
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# auxiliary-loss-free bias update
# ---------------------------------------------------------------------------------------------

def test_bias_update_moves_overloaded_down_and_underloaded_up():
    tokens = torch.tensor([10, 2, 4, 4])  # mean 5: expert 0 overloaded, the others underloaded
    bias = torch.zeros(4)
    update_expert_bias(bias, tokens, rate=0.1, zero_mean=False)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def test_bias_update_zero_mean_keeps_the_sum():
    tokens = torch.tensor([10, 2, 4, 4])
    bias = torch.tensor([0.3, -0.2, 0.0, 0.5])
    update_expert_bias(bias, tokens, rate=0.1, zero_mean=True)
    # raw update [-0.1, 0.1, 0.1, 0.1], mean 0.05 -> [-0.15, 0.05, 0.05, 0.05]
    torch.testing.assert_close(bias, torch.tensor([0.15, -0.15, 0.05, 0.55]))
    assert bias.sum().item() == pytest.approx(0.6)


def test_bias_update_leaves_exactly_balanced_experts_alone():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([6, 4, 5, 5]), rate=1.0, zero_mean=False)
    torch.testing.assert_close(bias, torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_bias_update_is_in_place_without_autograd():
    bias = torch.zeros(3)
    ref = bias
    update_expert_bias(bias, torch.tensor([3.0, 0.0, 0.0], requires_grad=True), rate=0.5, zero_mean=False)
    assert ref is bias and not bias.requires_grad


def test_bias_update_balances_a_skewed_router():
    generator = torch.Generator().manual_seed(5)
    N, E, k = 512, 8, 2
    skew = torch.linspace(2.0, -2.0, E)  # expert 0 strongly preferred
    scores = torch.sigmoid(torch.randn(N, E, generator=generator) + skew)
    bias = torch.zeros(E)

    def max_vio():
        idx = select_experts(scores, k, bias=bias)
        return router_stats(idx, scores, E)["max_vio"], idx

    start, _ = max_vio()
    for _ in range(200):
        _, idx = max_vio()
        update_expert_bias(bias, torch.bincount(idx.flatten(), minlength=E), rate=0.01, zero_mean=True)
    end, _ = max_vio()
    assert start > 1.0 and end < start / 5, (start, end)
    assert abs(bias.sum().item()) < 1e-5


# ---------------------------------------------------------------------------------------------
# capacity
# ---------------------------------------------------------------------------------------------

def test_expert_capacity_formula():
    assert expert_capacity(3, 2, 2, 0.5) == 2  # ceil(1.5)
    assert expert_capacity(8, 2, 4, 1.0) == 4
    assert expert_capacity(10, 1, 4, 1.25) == 4  # ceil(3.125)


def test_capacity_mask_hand_case_first_choices_first():
    # N = 3 tokens, k = 2, E = 2, capacity_factor 0.5 -> C = ceil(0.5 * 6 / 2) = 2.
    topk_idx = torch.tensor([[1, 0], [1, 0], [1, 0]])
    topk_weight = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    # First choices (largest weight): t0 -> 1, t1 -> 1, t2 -> 0 (its slot 1).
    #   expert 1 receives t0, t1 (full); expert 0 receives t2.
    # Second choices: t0 -> 0 (kept, expert 0 now full), t1 -> 0 (dropped), t2 -> 1 (dropped).
    expected = torch.tensor([[True, True], [True, False], [False, True]])
    assert torch.equal(capacity_keep_mask(topk_idx, topk_weight, 2, 0.5), expected)
    # (Plain token order would instead have dropped t2's first choice: t0 and t1 fill both experts.)


def test_capacity_mask_large_capacity_keeps_everything_and_counts_are_bounded():
    generator = torch.Generator().manual_seed(6)
    N, E, k = 40, 5, 2
    topk_idx = random_topk(N, E, k, generator)
    topk_weight = torch.rand(N, k, generator=generator)
    assert capacity_keep_mask(topk_idx, topk_weight, E, 100.0).all()
    keep = capacity_keep_mask(topk_idx, topk_weight, E, 0.6)
    capacity = math.ceil(0.6 * N * k / E)
    for i in range(E):
        received = int((topk_idx == i).sum())
        assert int(((topk_idx == i) & keep).sum()) == min(received, capacity)


# ---------------------------------------------------------------------------------------------
# router_stats
# ---------------------------------------------------------------------------------------------

def test_router_stats_hand_case():
    topk_idx = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 1]])
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25],   # entropy ln 4
                          [1.0, 0.0, 0.0, 0.0],       # entropy 0
                          [0.5, 0.5, 0.0, 0.0],       # entropy ln 2
                          [2.0, 2.0, 0.0, 0.0]],      # normalised first: ln 2
                         requires_grad=True)
    stats = router_stats(topk_idx, probs, 4)
    assert stats["tokens_per_expert"].tolist() == [4, 3, 1, 0]
    assert stats["tokens_per_expert"].dtype == torch.long
    torch.testing.assert_close(stats["load"], torch.tensor([0.5, 0.375, 0.125, 0.0]))
    assert stats["max_vio"] == pytest.approx((0.5 - 0.25) / 0.25)
    assert stats["dropped_fraction"] == pytest.approx(0.0)
    assert stats["entropy"] == pytest.approx((math.log(4) + 0 + math.log(2) + math.log(2)) / 4)
    assert not stats["load"].requires_grad


def test_router_stats_with_keep_mask():
    topk_idx = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 1]])
    keep = torch.tensor([[True, True], [True, True], [True, True], [False, False]])
    stats = router_stats(topk_idx, torch.full((4, 4), 0.25), 4, keep_mask=keep)
    assert stats["tokens_per_expert"].tolist() == [3, 2, 1, 0]
    torch.testing.assert_close(stats["load"], torch.tensor([3 / 6, 2 / 6, 1 / 6, 0.0]))
    assert stats["load"].sum().item() == pytest.approx(1.0)
    assert stats["max_vio"] == pytest.approx(1.0)  # (1/2 - 1/4) / (1/4)
    assert stats["dropped_fraction"] == pytest.approx(0.25)
    assert stats["entropy"] == pytest.approx(math.log(4))


def test_router_stats_collapse_and_balance_extremes():
    E = 4
    collapsed = router_stats(torch.zeros(8, 1, dtype=torch.long), torch.full((8, E), 0.25), E)
    assert collapsed["max_vio"] == pytest.approx(E - 1)
    balanced = router_stats(torch.arange(8).remainder(E).view(8, 1), torch.full((8, E), 0.25), E)
    assert balanced["max_vio"] == pytest.approx(0.0)
    nothing_kept = router_stats(torch.zeros(2, 1, dtype=torch.long), torch.full((2, E), 0.25), E,
                                keep_mask=torch.zeros(2, 1, dtype=torch.bool))
    assert nothing_kept["dropped_fraction"] == pytest.approx(1.0)
    assert nothing_kept["load"].sum().item() == 0.0
