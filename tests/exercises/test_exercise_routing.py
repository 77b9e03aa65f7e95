"""Exercises router-scoring, group-limited-routing, aux-loss-free-bias, switch-aux-loss,
sequence-aux-loss, capacity-dropping: router scores and gate weights, group-limited routing, the bias update, the
Switch and sequence-wise balance losses, capacity and dropping.

Every expected value comes from the formula written out here (or a hand-worked case), never
from the package's own function.
"""

from types import SimpleNamespace

import pytest
import torch

from minimoe.balance import capacity_keep_mask, sequence_aux_loss, switch_aux_loss, update_expert_bias
from minimoe.router import Router, select_experts


def router_config(scoring_func, norm_topk_prob, routed_scaling_factor, n_experts=8, k=3):
    return SimpleNamespace(
        n_routed_experts=n_experts, n_zero_experts=0, hidden_size=16, num_experts_per_tok=k,
        scoring_func=scoring_func, topk_method="greedy", n_group=1, topk_group=1,
        norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor,
        use_expert_bias=False, noisy_gating=False, initializer_range=0.5)


@pytest.mark.exercise("router-scoring", points=2)
@pytest.mark.parametrize("scoring_func,norm,scale", [("softmax", False, 1.0), ("softmax", True, 1.0),
                                                     ("sigmoid", True, 2.5), ("sigmoid", False, 16.0)])
def test_router_scoring_gate_weights_follow_the_formula(scoring_func, norm, scale):
    torch.manual_seed(0)
    router = Router(router_config(scoring_func, norm, scale))
    x = torch.randn(10, 16)
    out = router(x)
    logits = x @ router.weight.detach().t()  # (N, E)
    scores = logits.softmax(-1) if scoring_func == "softmax" else torch.sigmoid(logits)
    top, idx = scores.topk(3, dim=-1)
    weights = top / top.sum(-1, keepdim=True) if norm else top
    torch.testing.assert_close(out.scores.detach(), scores, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.topk_idx.sort(-1).values, idx.sort(-1).values)
    got = out.topk_weight.detach().gather(1, out.topk_idx.argsort(-1))  # order by expert id
    want = (weights * scale).gather(1, idx.argsort(-1))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.exercise("router-scoring", points=2)
def test_router_scoring_hand_case_sigmoid_renormalised():
    """logits 0, ln 3, -ln 3, ln 9: sigmoid 1/2, 3/4, 1/4, 9/10; top-2 {3/4, 9/10} renormalised."""
    router = Router(router_config("sigmoid", True, 2.0, n_experts=4, k=2))
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor([0.0, 1.0986123, -1.0986123, 2.1972246])
    out = router(torch.tensor([[1.0] + [0.0] * 15]))
    assert sorted(out.topk_idx[0].tolist()) == [1, 3]
    weight = dict(zip(out.topk_idx[0].tolist(), out.topk_weight[0].tolist()))
    assert weight[1] == pytest.approx(2 * 0.75 / 1.65, rel=1e-5)
    assert weight[3] == pytest.approx(2 * 0.9 / 1.65, rel=1e-5)


@pytest.mark.exercise("group-limited-routing", points=2)
def test_group_limited_hand_case_with_negative_biased_scores():
    """4 groups of 2; group scores (top-2 sums) -1.1, -0.5, -0.3, -2 -> groups 2 and 1 kept."""
    scores = torch.tensor([[-0.6, -0.5, -0.1, -0.4, -0.2, -0.1, -1.0, -1.0]])
    idx = select_experts(scores, 3, n_group=4, topk_group=2, group_score="top2_sum")
    # inside groups 1 and 2 the best three are experts 5 (-0.1), 2 (-0.1), 4 (-0.2); a 0 fill
    # instead of -inf would pick masked experts over them
    assert sorted(idx[0].tolist()) == [2, 4, 5]
    idx_max = select_experts(scores, 2, n_group=4, topk_group=1, group_score="max")
    # max per group: -0.5, -0.1, -0.1, -1.0 -> the first of the tied groups 1 and 2 by topk
    assert set(idx_max[0].tolist()) <= {2, 3, 4, 5} and len(set(idx_max[0].tolist())) == 2


@pytest.mark.exercise("group-limited-routing", points=2)
def test_group_limited_matches_brute_force_over_groups():
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(50, 16, generator=generator) - 0.5  # (N, E), negative entries too
    bias = torch.randn(16, generator=generator) * 0.1
    idx = select_experts(scores, 4, bias=bias, n_group=4, topk_group=2, group_score="top2_sum")
    biased = scores + bias
    for t in range(50):
        groups = biased[t].view(4, 4)
        group_score = groups.topk(2, dim=-1).values.sum(-1)
        kept = set(group_score.topk(2).indices.tolist())
        allowed = [e for e in range(16) if e // 4 in kept]
        best = sorted(allowed, key=lambda e: -biased[t, e].item())[:4]
        assert sorted(idx[t].tolist()) == sorted(best)


@pytest.mark.exercise("aux-loss-free-bias", points=2)
def test_bias_update_hand_case():
    bias = torch.tensor([0.0, 0.5, -0.25, 0.0])
    update_expert_bias(bias, torch.tensor([10.0, 2.0, 4.0, 4.0]), rate=0.1, zero_mean=False)
    # mean load 5: overloaded expert 0 goes down, the others up
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.6, -0.15, 0.1]))
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10.0, 2.0, 4.0, 4.0]), rate=0.1, zero_mean=True)
    # delta (-0.1, 0.1, 0.1, 0.1) minus its mean 0.05
    torch.testing.assert_close(bias, torch.tensor([-0.15, 0.05, 0.05, 0.05]))
    assert not bias.requires_grad


@pytest.mark.exercise("aux-loss-free-bias", points=2)
def test_bias_update_leaves_balanced_experts_alone():
    bias = torch.tensor([0.3, -0.3, 0.0])
    update_expert_bias(bias, torch.tensor([7, 7, 7]), rate=0.01, zero_mean=True)
    torch.testing.assert_close(bias, torch.tensor([0.3, -0.3, 0.0]))


@pytest.mark.exercise("switch-aux-loss", points=1)
def test_switch_loss_hand_cases():
    # uniform probabilities and perfectly balanced choices: exactly 1
    probs = torch.full((4, 4), 0.25)
    assert switch_aux_loss(probs, torch.tensor([[0], [1], [2], [3]])).item() == pytest.approx(1.0)
    # every token sends both slots' mass to expert 0 with prob 0.7: E * f_0 * P_0 + ...
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 2)
    topk = torch.tensor([[0, 1], [0, 2]])  # f = (2/4, 1/4, 1/4, 0)
    want = 4 * (0.5 * 0.7 + 0.25 * 0.1 + 0.25 * 0.1)
    assert switch_aux_loss(probs, topk).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.exercise("switch-aux-loss", points=1)
def test_switch_loss_gradient_flows_through_probabilities_only():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    topk = torch.tensor([[0], [0], [0], [1], [2], [3]])  # f = (1/2, 1/6, 1/6, 1/6)
    switch_aux_loss(logits.softmax(-1), topk).backward()
    f = torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6])
    want = torch.autograd.grad((4 * (f * logits.softmax(-1).mean(0)).sum()), logits)[0]
    torch.testing.assert_close(logits.grad, want)


@pytest.mark.exercise("sequence-aux-loss", points=2)
def test_sequence_loss_by_the_loops_of_eq_17_to_20():
    generator = torch.Generator().manual_seed(3)
    B, T, E, k = 3, 5, 6, 2
    scores = torch.rand(B, T, E, generator=generator) + 0.01
    topk = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(B * T)]).view(B, T, k)
    total = 0.0
    for b in range(B):
        for i in range(E):
            f = E / (k * T) * sum(int(i in topk[b, t].tolist()) for t in range(T))
            p = sum((scores[b, t, i] / scores[b, t].sum()).item() for t in range(T)) / T
            total += f * p
    assert sequence_aux_loss(scores, topk).item() == pytest.approx(total / B, rel=1e-5)


@pytest.mark.exercise("sequence-aux-loss", points=2)
def test_sequence_loss_is_one_for_balanced_uniform_sequences():
    scores = torch.full((2, 4, 4), 0.3)
    topk = torch.tensor([[[0], [1], [2], [3]], [[3], [2], [1], [0]]])
    assert sequence_aux_loss(scores, topk).item() == pytest.approx(1.0)


@pytest.mark.exercise("capacity-dropping", points=3)
def test_capacity_hand_case_rank_major_priority():
    """N=4, k=2, E=2, factor 0.5 -> C = ceil(0.5 * 8 / 2) = 2 slots per expert.

    First choices (by weight) go first in token order: t0->0, t1->0, t2->1, t3->0 (dropped:
    expert 0 is full); then second choices: t0->1 (kept, 2nd slot of expert 1), t1->1, t2->0,
    t3->1 all dropped.
    """
    topk_idx = torch.tensor([[0, 1], [1, 0], [1, 0], [0, 1]])
    topk_weight = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.9, 0.1]])
    keep = capacity_keep_mask(topk_idx, topk_weight, n_experts=2, capacity_factor=0.5)
    want = torch.tensor([[True, True], [False, True], [True, False], [False, False]])
    assert torch.equal(keep, want)


@pytest.mark.exercise("capacity-dropping", points=3)
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25, 4.0])
def test_capacity_matches_a_sequential_simulation(factor):
    import math

    generator = torch.Generator().manual_seed(4)
    N, k, E = 40, 2, 4
    topk_idx = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(N)])
    topk_weight = torch.rand(N, k, generator=generator)
    capacity = math.ceil(factor * N * k / E)
    want = torch.zeros(N, k, dtype=torch.bool)
    used = [0] * E
    for rank in range(k):
        for t in range(N):
            slot = sorted(range(k), key=lambda j: (-topk_weight[t, j].item(), j))[rank]
            expert = topk_idx[t, slot].item()
            if used[expert] < capacity:
                used[expert] += 1
                want[t, slot] = True
    assert torch.equal(capacity_keep_mask(topk_idx, topk_weight, E, factor), want)
