"""Tests for minimoe.router: hand-computed routing cases and a brute-force reference."""

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minimoe.config import ModelConfig
from minimoe.router import Router, RouterOutput, gate_weights, select_experts


def make_cfg(**overrides) -> ModelConfig:
    """A small valid config; the router only reads the MoE fields."""
    values = dict(hidden_size=4, num_attention_heads=1, n_routed_experts=4, num_experts_per_tok=2,
                  n_shared_experts=0, scoring_func="sigmoid", topk_method="greedy", n_group=1,
                  topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
                  use_expert_bias=False)
    values.update(overrides)
    return ModelConfig(**values)


def identity_router(cfg: ModelConfig) -> Router:
    """A router whose logits equal its input (weight = identity), so tests choose the logits."""
    router = Router(cfg)
    assert router.weight.shape[0] == router.weight.shape[1]
    with torch.no_grad():
        router.weight.copy_(torch.eye(router.weight.shape[0]))
    return router


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float32)
    return torch.log(p) - torch.log1p(-p)


# ---------------------------------------------------------------------------------------------
# select_experts: hand-computed cases
# ---------------------------------------------------------------------------------------------

def test_v3_top2_sum_and_v2_max_choose_different_groups():
    # group 0 = experts {0, 1} = [0.9, 0.1]: max 0.9, top-2 sum 1.0
    # group 1 = experts {2, 3} = [0.6, 0.6]: max 0.6, top-2 sum 1.2
    scores = torch.tensor([[0.9, 0.1, 0.6, 0.6]])
    by_max = select_experts(scores, 2, n_group=2, topk_group=1, group_score="max")
    by_sum = select_experts(scores, 2, n_group=2, topk_group=1, group_score="top2_sum")
    assert sorted(by_max[0].tolist()) == [0, 1]
    assert sorted(by_sum[0].tolist()) == [2, 3]


def test_dropped_groups_are_masked_with_minus_inf_not_zero():
    # Sigmoid scores with a large negative bias: every biased score is negative.
    scores = torch.tensor([[0.5, 0.4, 0.3, 0.2]])
    bias = torch.full((4,), -1.0)
    # biased = [-0.5, -0.6 | -0.7, -0.8]; group sums -1.1 (kept) and -1.5 (dropped).
    chosen = select_experts(scores, 2, bias=bias, n_group=2, topk_group=1, group_score="top2_sum")
    assert chosen[0].tolist() == [0, 1]
    # The trap, written out by hand: masking the dropped group with 0 makes its experts
    # (value 0 > -0.5) win, i.e. the token would use experts of a group it may not use.
    masked_with_zero = torch.tensor([[-0.5, -0.6, 0.0, 0.0]])
    assert sorted(masked_with_zero.topk(2).indices[0].tolist()) == [2, 3]


def test_mixed_sign_biased_scores_with_two_kept_groups():
    # 3 groups of 2, keep 2 groups, k = 3. Biased scores:
    #   g0 = [-0.2, -0.3] (sum -0.5)   g1 = [0.4, -0.6] (sum -0.2)   g2 = [-0.1, -0.9] (sum -1.0)
    # kept groups: g1, g0; top-3 among {0, 1, 2, 3}: 2 (0.4), 0 (-0.2), 1 (-0.3).
    scores = torch.tensor([[0.8, 0.7, 0.9, 0.4, 0.9, 0.1]])
    bias = torch.tensor([-1.0, -1.0, -0.5, -1.0, -1.0, -1.0])
    chosen = select_experts(scores, 3, bias=bias, n_group=3, topk_group=2, group_score="top2_sum")
    assert chosen[0].tolist() == [2, 0, 1]


def test_bias_changes_selection_but_not_gate_weights():
    scores = torch.tensor([[0.9, 0.8, 0.3, 0.2]])
    bias = torch.tensor([0.0, -1.0, 0.5, 0.0])  # biased: [0.9, -0.2, 0.8, 0.2]
    assert sorted(select_experts(scores, 2)[0].tolist()) == [0, 1]
    chosen = select_experts(scores, 2, bias=bias)
    assert chosen[0].tolist() == [0, 2]
    weights = gate_weights(scores, chosen, norm_topk_prob=True, routed_scaling_factor=2.5)
    # unbiased 0.9 and 0.3, renormalised: 0.75, 0.25; times 2.5
    torch.testing.assert_close(weights, torch.tensor([[1.875, 0.625]]))


def test_router_uses_bias_only_when_configured():
    scores = torch.tensor([[0.9, 0.8, 0.3, 0.2]])
    x = logit(scores)  # sigmoid(x) == scores with an identity weight
    for use_bias, expected_idx, expected_w in [(True, [0, 2], [1.875, 0.625]),
                                               (False, [0, 1], [2.5 * 9 / 17, 2.5 * 8 / 17])]:
        router = identity_router(make_cfg(use_expert_bias=use_bias, routed_scaling_factor=2.5))
        router.e_score_correction_bias.copy_(torch.tensor([0.0, -1.0, 0.5, 0.0]))
        out = router(x)
        assert out.topk_idx[0].tolist() == expected_idx
        torch.testing.assert_close(out.topk_weight, torch.tensor([expected_w]))
        torch.testing.assert_close(out.scores, scores)  # scores never include the bias


def test_gate_weights_denominator_epsilon():
    scores = torch.zeros(1, 4)
    weights = gate_weights(scores, torch.tensor([[0, 1]]), norm_topk_prob=True, routed_scaling_factor=1.0)
    assert torch.isfinite(weights).all() and (weights == 0).all()


# ---------------------------------------------------------------------------------------------
# Router: softmax / sigmoid / groups / zero experts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm, expected", [(False, [0.5, 0.3]), (True, [0.625, 0.375])])
def test_softmax_topk_with_and_without_renormalisation(norm, expected):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    router = identity_router(make_cfg(scoring_func="softmax", norm_topk_prob=norm))
    out = router(torch.log(probs))  # softmax(log p) = p
    assert isinstance(out, RouterOutput)
    torch.testing.assert_close(out.scores, probs)
    assert out.topk_idx[0].tolist() == [0, 1]
    torch.testing.assert_close(out.topk_weight, torch.tensor([expected]))


def test_sigmoid_weights_sum_to_routed_scaling_factor():
    torch.manual_seed(0)
    cfg = make_cfg(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, scoring_func="sigmoid",
                   topk_method="noaux_tc", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                   use_expert_bias=True)
    router = Router(cfg)
    router.e_score_correction_bias.normal_()
    x = torch.randn(64, 32)
    out = router(x)
    assert out.topk_idx.shape == (64, 4) and out.topk_idx.dtype == torch.long
    assert out.scores.shape == (64, 16) and out.logits.shape == (64, 16)
    torch.testing.assert_close(out.topk_weight.sum(-1), torch.full((64,), 2.5))
    # selected experts come from at most topk_group = 2 groups of 4
    groups_used = (out.topk_idx // 4).tolist()
    assert all(len(set(row)) <= 2 for row in groups_used)


def test_logits_are_float32_for_low_precision_inputs():
    torch.manual_seed(0)
    router = Router(make_cfg(hidden_size=8, n_routed_experts=4)).to(torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    out = router(x)
    assert out.logits.dtype == torch.float32 and out.scores.dtype == torch.float32
    assert out.topk_weight.dtype == torch.float32
    torch.testing.assert_close(out.logits, x.float() @ router.weight.float().t())


@pytest.mark.parametrize("method, expected", [("group_limited_greedy", [0, 1]), ("noaux_tc", [2, 3])])
def test_router_group_score_follows_topk_method(method, expected):
    # same numbers as the select_experts case: max picks group 0, top-2 sum picks group 1
    scores = torch.tensor([[0.9, 0.1, 0.6, 0.6]])
    router = identity_router(make_cfg(topk_method=method, n_group=2, topk_group=1))
    out = router(logit(scores))
    assert sorted(out.topk_idx[0].tolist()) == expected


def test_zero_computation_experts_share_the_topk():
    cfg = make_cfg(hidden_size=6, n_routed_experts=4, n_zero_experts=2, scoring_func="softmax",
                   norm_topk_prob=False, routed_scaling_factor=6.0, use_expert_bias=True)
    router = identity_router(cfg)
    assert router.weight.shape == (6, 6)
    assert router.e_score_correction_bias.shape == (6,)
    x = torch.tensor([[0.5, 2.0, 0.0, 0.0, 0.0, 3.0]])  # zero expert 5 and FFN expert 1 lead
    out = router(x)
    assert out.topk_idx[0].tolist() == [5, 1]
    probs = torch.exp(x) / torch.exp(x).sum()
    torch.testing.assert_close(out.topk_weight, 6.0 * probs[:, [5, 1]])
    # the correction bias can push a zero expert out of the top-k
    router.e_score_correction_bias[5] = -1.0
    assert router(x).topk_idx[0].tolist() == [1, 0]


def test_state_dict_names():
    names = set(Router(make_cfg()).state_dict())
    assert names == {"weight", "e_score_correction_bias"}
    names = set(Router(make_cfg(noisy_gating=True)).state_dict())
    assert names == {"weight", "e_score_correction_bias", "noise_weight"}
    assert Router(make_cfg()).e_score_correction_bias.dtype == torch.float32


def test_gradient_reaches_router_weight_through_gate_weights():
    torch.manual_seed(0)
    router = Router(make_cfg(hidden_size=8, n_routed_experts=8, num_experts_per_tok=2))
    out = router(torch.randn(10, 8))
    (out.topk_weight * torch.randn(10, 2)).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Noisy top-k gating (Shazeer et al. 2017)
# ---------------------------------------------------------------------------------------------

def noisy_router():
    torch.manual_seed(0)
    return Router(make_cfg(hidden_size=8, n_routed_experts=8, scoring_func="softmax",
                           norm_topk_prob=False, noisy_gating=True))


def test_no_noise_in_eval_mode():
    router = noisy_router().eval()
    x = torch.randn(16, 8)
    first, second = router(x), router(x)
    torch.testing.assert_close(first.logits, x @ router.weight.t(), rtol=0, atol=0)
    torch.testing.assert_close(first.logits, second.logits, rtol=0, atol=0)


def test_noise_in_training_mode():
    router = noisy_router().train()
    x = torch.randn(16, 8)
    clean = x @ router.weight.t()
    first, second = router(x), router(x)
    assert not torch.allclose(first.logits, clean)
    assert not torch.allclose(first.logits, second.logits)
    # noise scale at init is softplus(0) = ln 2: the noise has std about 0.69
    noise_std = (first.logits - clean).std().item()
    assert 0.4 < noise_std < 1.0, noise_std


def test_gradient_reaches_noise_weight():
    router = noisy_router().train()
    out = router(torch.randn(32, 8))
    out.topk_weight.sum().backward()  # no renormalisation: depends on the noisy logits
    assert router.noise_weight.grad is not None
    assert torch.isfinite(router.noise_weight.grad).all()
    assert router.noise_weight.grad.abs().sum() > 0


def test_plain_router_has_no_noise_in_training():
    torch.manual_seed(0)
    router = Router(make_cfg(hidden_size=8, n_routed_experts=8)).train()
    assert router.noise_weight is None
    x = torch.randn(4, 8)
    torch.testing.assert_close(router(x).logits, x @ router.weight.t(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Brute-force reference over random inputs
# ---------------------------------------------------------------------------------------------

def brute_force_select(scores, k, bias, n_group, topk_group, group_score):
    """Enumerate every allowed set of groups; plain Python floats, no torch ops."""
    result = []
    for row in scores:
        E = len(row)
        per_group = E // n_group
        biased = [row[i] + (bias[i] if bias is not None else 0.0) for i in range(E)]
        group_value = []
        for g in range(n_group):
            members = sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)
            group_value.append(members[0] if group_score == "max" else members[0] + members[1])
        best_groups = max(itertools.combinations(range(n_group), topk_group),
                          key=lambda combo: sum(group_value[g] for g in combo))
        allowed = [i for g in best_groups for i in range(g * per_group, (g + 1) * per_group)]
        result.append(sorted(allowed, key=lambda i: biased[i], reverse=True)[:k])
    return result


@st.composite
def routing_cases(draw):
    n_group = draw(st.integers(1, 4))
    group_score = draw(st.sampled_from(["top2_sum", "max"]))
    per_group = draw(st.integers(2 if group_score == "top2_sum" else 1, 4))
    topk_group = draw(st.integers(1, n_group))
    k = draw(st.integers(1, topk_group * per_group))
    n_tokens = draw(st.integers(1, 6))
    bias_kind = draw(st.sampled_from(["none", "mixed", "negative"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return n_group, per_group, topk_group, k, n_tokens, group_score, bias_kind, seed


@settings(max_examples=300, deadline=None)
@given(routing_cases())
def test_select_experts_matches_brute_force(case):
    n_group, per_group, topk_group, k, n_tokens, group_score, bias_kind, seed = case
    E = n_group * per_group
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_tokens, E, generator=generator, dtype=torch.float64)
    bias = None
    if bias_kind == "mixed":
        bias = 0.5 * torch.randn(E, generator=generator, dtype=torch.float64)
    elif bias_kind == "negative":
        bias = -1.0 - torch.rand(E, generator=generator, dtype=torch.float64)
    got = select_experts(scores, k, bias=bias, n_group=n_group, topk_group=topk_group,
                         group_score=group_score)
    expected = brute_force_select(scores.tolist(), k, None if bias is None else bias.tolist(),
                                  n_group, topk_group, group_score)
    assert got.tolist() == expected


def test_select_experts_rejects_impossible_requests():
    scores = torch.rand(2, 8)
    with pytest.raises(ValueError):
        select_experts(scores, 5, n_group=4, topk_group=2)  # 2 groups of 2 hold only 4 experts
    with pytest.raises(ValueError):
        select_experts(scores, 2, n_group=3, topk_group=1)  # 8 experts do not split into 3 groups
    with pytest.raises(ValueError):
        select_experts(scores, 2, group_score="mean")
