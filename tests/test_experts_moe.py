"""Tests for minimoe.experts and minimoe.moe: the experts, the three dispatches, the MoE layer."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minimoe import balance
from minimoe.config import ModelConfig
from minimoe.experts import RoutedExperts, SwiGLU
from minimoe.moe import (
    FUSED_GATE_UP_MAX_WIDTH,
    MoE,
    dispatch_gather,
    dispatch_naive,
    dispatch_sorted,
    grouped_mm_backend,
)
from minimoe.router import RouterOutput

BACKENDS = ["grouped_mm", "loop"]


def make_experts(E, C, I, dtype=torch.float32, std=0.3):
    experts = RoutedExperts(E, C, I, init_std=std)
    return experts.to(dtype)


def brute_force(x, topk_idx, topk_weight, experts, mask=None):
    """For each token, for each of its k slots: w * expert(x), written from the formula."""
    N, k = topk_idx.shape
    rows = []
    for t in range(N):
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(k):
            if mask is not None and not mask[t, j]:
                continue
            e = int(topk_idx[t, j])
            xt = x[t].double()
            h = F.silu(experts.gate_proj[e].double() @ xt) * (experts.up_proj[e].double() @ xt)
            total += topk_weight[t, j].double() * (experts.down_proj[e].double() @ h)
        rows.append(total)
    return torch.stack(rows)


def outputs_and_grads(fn, x, topk_idx, topk_weight, experts, **kwargs):
    """Run fn, backprop a fixed random cotangent, return (out, [dx, dw, dWg, dWu, dWd])."""
    x = x.detach().clone().requires_grad_()
    topk_weight = topk_weight.detach().clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    out = fn(x, topk_idx, topk_weight, experts, **kwargs)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(cotangent)
    grads = [x.grad, topk_weight.grad] + [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in
        (experts.gate_proj, experts.up_proj, experts.down_proj)
    ]
    return out.detach(), grads


def assert_same(a, b, atol=1e-5, rtol=1e-5):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    for name, ga, gb in zip(("x", "weight", "gate_proj", "up_proj", "down_proj"), grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=atol, rtol=rtol, msg=f"gradient of {name}")


# ---------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------

def test_swiglu_formula():
    ffn = SwiGLU(6, 10)
    x = torch.randn(3, 6)
    expected = (F.silu(x @ ffn.gate_proj.weight.T) * (x @ ffn.up_proj.weight.T)) @ ffn.down_proj.weight.T
    torch.testing.assert_close(ffn(x), expected)
    assert ffn.gate_proj.bias is None and ffn.down_proj.weight.shape == (6, 10)


def test_expert_forward_equals_swiglu_with_the_same_weights():
    experts = make_experts(4, 6, 10)
    assert experts.gate_proj.shape == (4, 10, 6) and experts.down_proj.shape == (4, 6, 10)
    ffn = SwiGLU(6, 10)
    with torch.no_grad():
        ffn.gate_proj.weight.copy_(experts.gate_proj[2])
        ffn.up_proj.weight.copy_(experts.up_proj[2])
        ffn.down_proj.weight.copy_(experts.down_proj[2])
    x = torch.randn(5, 6)
    torch.testing.assert_close(experts.expert_forward(2, x), ffn(x))


def test_routed_experts_init_std():
    experts = RoutedExperts(8, 64, 32)
    assert experts.gate_proj.std().item() == pytest.approx(0.02, rel=0.05)


# ---------------------------------------------------------------------------------------------
# Dispatch: naive vs brute force, sorted vs naive
# ---------------------------------------------------------------------------------------------

def test_naive_matches_brute_force():
    experts = make_experts(4, 8, 12)
    x = torch.randn(7, 8)
    topk_idx = torch.tensor([[0, 1], [1, 0], [3, 1], [3, 0], [1, 3], [0, 3], [1, 0]])  # 2 unused
    topk_weight = torch.rand(7, 2)
    out = dispatch_naive(x, topk_idx, topk_weight, experts)
    torch.testing.assert_close(out.double(), brute_force(x, topk_idx, topk_weight, experts),
                               atol=1e-5, rtol=1e-5)


def test_naive_respects_the_mask():
    experts = make_experts(3, 8, 4)
    x = torch.randn(5, 8)
    topk_idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 1]])
    topk_weight = torch.rand(5, 2)
    mask = torch.tensor([[True, False], [True, True], [False, False], [False, True], [True, True]])
    out = dispatch_naive(x, topk_idx, topk_weight, experts, mask=mask)
    torch.testing.assert_close(out.double(), brute_force(x, topk_idx, topk_weight, experts, mask),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(out[2], torch.zeros(8))


def routing(name, N, E, k, generator):
    if name == "random":  # experts E-2 and E-1 never chosen
        idx = torch.stack([torch.randperm(E - 2, generator=generator)[:k] for _ in range(N)])
    elif name == "skewed":  # every token's first slot goes to expert 1
        idx = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(N)])
        idx[:, 0] = 1
        idx[:, 1:] = torch.where(idx[:, 1:] == 1, 0, idx[:, 1:])
    elif name == "all_one_expert":  # k = 1, everything to expert 3
        idx = torch.full((N, k), 3)
    else:
        raise ValueError(name)
    return idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [("random", 37, 6, 3), ("random", 11, 5, 1),
                                  ("skewed", 23, 6, 2), ("all_one_expert", 19, 6, 1)])
def test_sorted_matches_naive_outputs_and_gradients(case, backend):
    name, N, E, k = case
    gen = torch.Generator().manual_seed(N)
    experts = make_experts(E, 16, 12)
    x = torch.randn(N, 16, generator=gen)
    topk_idx = routing(name, N, E, k, gen)
    topk_weight = torch.rand(N, k, generator=gen)
    naive = outputs_and_grads(dispatch_naive, x, topk_idx, topk_weight, experts)
    fast = outputs_and_grads(dispatch_sorted, x, topk_idx, topk_weight, experts, backend=backend)
    assert_same(naive, fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sorted_matches_naive_with_a_mask(backend):
    gen = torch.Generator().manual_seed(3)
    experts = make_experts(5, 8, 4)
    x = torch.randn(29, 8, generator=gen)
    topk_idx = torch.randint(0, 7, (29, 3), generator=gen)  # 5, 6 play zero experts
    topk_weight = torch.rand(29, 3, generator=gen)
    mask = (topk_idx < 5) & (torch.rand(29, 3, generator=gen) > 0.3)
    naive = outputs_and_grads(dispatch_naive, x, topk_idx, topk_weight, experts, mask=mask)
    fast = outputs_and_grads(dispatch_sorted, x, topk_idx, topk_weight, experts, mask=mask,
                             backend=backend)
    assert_same(naive, fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sorted_with_nothing_to_compute(backend):
    experts = make_experts(3, 8, 4)
    x = torch.randn(4, 8, requires_grad=True)
    topk_idx = torch.zeros(4, 2, dtype=torch.long)
    topk_weight = torch.rand(4, 2, requires_grad=True)
    out = dispatch_sorted(x, topk_idx, topk_weight, experts,
                          mask=torch.zeros(4, 2, dtype=torch.bool), backend=backend)
    assert torch.equal(out, torch.zeros(4, 8))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(4, 8))
    assert torch.equal(experts.gate_proj.grad, torch.zeros_like(experts.gate_proj))


# wider than FUSED_GATE_UP_MAX_WIDTH: the sorted dispatch runs gate and up as two products
WIDE = FUSED_GATE_UP_MAX_WIDTH + 4


@pytest.mark.parametrize("dispatch", [dispatch_sorted, dispatch_gather])
@given(
    N=st.integers(1, 40), C=st.sampled_from([4, 6, 8, 16]), I=st.sampled_from([3, 4, 8, 12, WIDE]),
    E=st.integers(1, 7), k=st.integers(1, 3), masked=st.booleans(), seed=st.integers(0, 2**16),
)
def test_dispatch_matches_naive_property(dispatch, N, C, I, E, k, masked, seed):
    """Outputs and every gradient, with and without a mask."""
    gen = torch.Generator().manual_seed(seed)
    experts = RoutedExperts(E, C, I, init_std=0.3)
    x = torch.randn(N, C, generator=gen)
    topk_idx = torch.randint(0, E, (N, k), generator=gen)  # repeats allowed: still a valid sum
    topk_weight = torch.rand(N, k, generator=gen)
    mask = torch.rand(N, k, generator=gen) > 0.4 if masked else None
    if masked:
        mask[0, 0] = True  # (with nothing computed, the naive loop's zeros have no gradient)
    naive = outputs_and_grads(dispatch_naive, x, topk_idx, topk_weight, experts, mask=mask)
    fast = outputs_and_grads(dispatch, x, topk_idx, topk_weight, experts, mask=mask)
    assert_same(naive, fast)


def test_sorted_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)
    N, C, I, E, k = 6, 4, 3, 3, 2
    experts = RoutedExperts(E, C, I, init_std=0.5).double()
    x = torch.randn(N, C, dtype=torch.float64, generator=gen, requires_grad=True)
    topk_idx = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 2], [0, 0], [2, 0]])  # expert 1 unused
    topk_weight = torch.rand(N, k, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: dispatch_sorted(x, topk_idx, w, experts, backend="loop"), (x, topk_weight))


def test_bfloat16_sorted_close_to_naive():
    gen = torch.Generator().manual_seed(5)
    experts = make_experts(4, 16, 16, dtype=torch.bfloat16)
    x = torch.randn(21, 16, generator=gen).bfloat16()
    topk_idx = torch.randint(0, 4, (21, 2), generator=gen)
    topk_weight = torch.rand(21, 2, generator=gen)
    naive = outputs_and_grads(dispatch_naive, x, topk_idx, topk_weight, experts)
    fast = outputs_and_grads(dispatch_sorted, x, topk_idx, topk_weight, experts)
    assert naive[0].dtype == fast[0].dtype == torch.float32  # combine accumulates in float32
    assert_same(naive, fast, atol=3e-2, rtol=3e-2)


def test_grouped_mm_backend_choices():
    assert grouped_mm_backend("cpu", torch.float32) in ("grouped_mm", "loop")
    assert grouped_mm_backend("cpu", torch.float64) == "loop"  # not supported by _grouped_mm
    assert grouped_mm_backend("cpu", torch.float32, 6, 8) == "loop"  # 24-byte rows
    assert grouped_mm_backend("cpu", torch.bfloat16, 12, 16) == "loop"  # 24-byte rows


def test_gather_matches_brute_force_with_a_mask():
    gen = torch.Generator().manual_seed(4)
    experts = make_experts(5, 8, 6)
    x = torch.randn(9, 8, generator=gen)
    topk_idx = torch.randint(0, 7, (9, 3), generator=gen)  # 5, 6 play zero experts
    topk_weight = torch.rand(9, 3, generator=gen)
    mask = (topk_idx < 5) & (torch.rand(9, 3, generator=gen) > 0.3)
    out = dispatch_gather(x, topk_idx, topk_weight, experts, mask=mask)
    torch.testing.assert_close(out.double(), brute_force(x, topk_idx, topk_weight, experts, mask),
                               atol=1e-5, rtol=1e-5)


def test_gather_layer_agrees_with_sorted_and_is_a_per_layer_switch():
    torch.manual_seed(0)
    layer = MoE(small_cfg(n_zero_experts=2)).eval()
    x = torch.randn(1, 3, 16)
    sorted_out, _ = layer(x)
    layer.dispatch_override = "gather"
    assert "dispatch='gather'" in repr(layer)
    gather_out, _ = layer(x)
    torch.testing.assert_close(gather_out, sorted_out, atol=1e-6, rtol=1e-5)
    assert layer.cfg.dispatch == "sorted"  # the config is not touched
    layer.dispatch_override = None
    assert layer.dispatch == "sorted"


def test_out_of_range_expert_index_is_rejected():
    experts = make_experts(3, 8, 4)
    x = torch.randn(2, 8)
    topk_idx = torch.tensor([[0, 3], [1, 2]])
    topk_weight = torch.rand(2, 2)
    for fn in (dispatch_naive, dispatch_sorted, dispatch_gather):
        with pytest.raises(ValueError, match="expert indices"):
            fn(x, topk_idx, topk_weight, experts)
        fn(x, topk_idx, topk_weight, experts, mask=topk_idx < 3)  # excluded by the mask: fine


# ---------------------------------------------------------------------------------------------
# The MoE layer
# ---------------------------------------------------------------------------------------------

def small_cfg(**changes):
    values = dict(hidden_size=16, num_attention_heads=2, attention="mha", q_lora_rank=None,
                  n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=8,
                  n_shared_experts=1, scoring_func="softmax", topk_method="greedy",
                  n_group=1, topk_group=1, norm_topk_prob=False, use_expert_bias=True)
    values.update(changes)
    return ModelConfig(**values)


class FixedGate(torch.nn.Module):
    """Stands in for the router: returns a fixed routing (and keeps the bias buffer)."""

    def __init__(self, topk_idx, topk_weight, n_experts):
        super().__init__()
        self.topk_idx, self.topk_weight = topk_idx, topk_weight
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))
        self.n_experts = n_experts

    def forward(self, x):
        N = x.shape[0]
        logits = torch.zeros(N, self.n_experts)
        return RouterOutput(self.topk_idx, self.topk_weight, logits.softmax(-1), logits)


def test_moe_output_is_routed_plus_shared():
    cfg = small_cfg(n_shared_experts=2)
    moe = MoE(cfg)
    assert moe.shared_experts.gate_proj.weight.shape == (16, 16)  # 2 x moe_intermediate_size
    x = torch.randn(2, 5, 16)
    y, aux = moe(x)
    flat = x.view(10, 16)
    route = moe.gate(flat)
    routed = dispatch_naive(flat, route.topk_idx, route.topk_weight, moe.experts)
    torch.testing.assert_close(y.view(10, 16), routed + moe.shared_experts(flat),
                               atol=1e-6, rtol=1e-5)
    assert set(aux) == {"losses", "router"} and aux["losses"] == {}


def test_moe_without_shared_experts():
    moe = MoE(small_cfg(n_shared_experts=0))
    assert moe.shared_experts is None
    y, _ = moe(torch.randn(1, 3, 16))
    assert y.shape == (1, 3, 16)


def test_zero_experts_return_weight_times_x():
    cfg = small_cfg(n_zero_experts=4, n_shared_experts=0, num_experts_per_tok=3,
                    routed_scaling_factor=2.0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.experts.down_proj.zero_()  # every FFN expert now returns 0
    x = torch.randn(2, 9, 16)
    y, aux = moe(x)
    route = moe.gate(x.view(18, 16))
    is_zero = route.topk_idx >= cfg.n_routed_experts
    assert is_zero.any() and (~is_zero).any()  # both kinds chosen
    zero_weight = (route.topk_weight * is_zero).sum(-1, keepdim=True)  # scaling factor included
    torch.testing.assert_close(y.view(18, 16), zero_weight * x.view(18, 16), atol=0, rtol=0)
    assert aux["router"]["tokens_per_expert"].shape == (10,)  # stats over all E = 6 + 4


def test_capacity_drops_the_right_slots():
    # 4 tokens, 2 experts, k = 1, capacity_factor 1 -> capacity ceil(4 * 1 / 2) = 2 per expert.
    # Tokens 0..3 all choose expert 0: tokens 0 and 1 fit, tokens 2 and 3 are dropped.
    cfg = small_cfg(n_routed_experts=2, num_experts_per_tok=1, capacity_factor=1.0)
    moe = MoE(cfg)
    topk_idx = torch.zeros(4, 1, dtype=torch.long)
    topk_weight = torch.full((4, 1), 0.5)
    moe.gate = FixedGate(topk_idx, topk_weight, 2)
    x = torch.randn(1, 4, 16)
    y, aux = moe(x)
    flat = x.view(4, 16)
    shared = moe.shared_experts(flat)
    expected = shared.clone()
    expected[:2] += 0.5 * moe.experts.expert_forward(0, flat[:2])
    torch.testing.assert_close(y.view(4, 16), expected, atol=1e-6, rtol=1e-5)
    assert aux["router"]["dropped_fraction"] == pytest.approx(0.5)
    assert aux["router"]["tokens_per_expert"].tolist() == [2, 0]


def test_capacity_never_drops_zero_expert_slots():
    # expert 2 is a zero expert; all 4 tokens choose it: capacity would be 2, all 4 are kept.
    cfg = small_cfg(n_routed_experts=2, n_zero_experts=2, num_experts_per_tok=1,
                    capacity_factor=1.0, n_shared_experts=0)
    moe = MoE(cfg)
    moe.gate = FixedGate(torch.full((4, 1), 2), torch.full((4, 1), 0.25), 4)
    x = torch.randn(1, 4, 16)
    y, aux = moe(x)
    torch.testing.assert_close(y, 0.25 * x)
    assert aux["router"]["dropped_fraction"] == 0.0


def test_losses_only_in_training_and_with_positive_coefficients():
    cfg = small_cfg(aux_loss_alpha=0.01, seq_aux_loss_alpha=1e-4, z_loss_coef=1e-3)
    moe = MoE(cfg).train()
    x = torch.randn(3, 4, 16)
    _, aux = moe(x)
    assert set(aux["losses"]) == {"aux", "seq_aux", "z"}
    route = moe.gate(x.view(12, 16))
    probs = route.scores / route.scores.sum(-1, keepdim=True)
    torch.testing.assert_close(aux["losses"]["aux"],
                               0.01 * balance.switch_aux_loss(probs, route.topk_idx))
    torch.testing.assert_close(aux["losses"]["seq_aux"], 1e-4 * balance.sequence_aux_loss(
        route.scores.view(3, 4, 6), route.topk_idx.view(3, 4, 2)))
    torch.testing.assert_close(aux["losses"]["z"], 1e-3 * balance.router_z_loss(route.logits))
    aux["losses"]["aux"].backward()  # a differentiable scalar
    assert moe.gate.weight.grad is not None

    _, aux = moe.eval()(x)
    assert aux["losses"] == {}
    _, aux = MoE(small_cfg(z_loss_coef=1e-3)).train()(x)
    assert set(aux["losses"]) == {"z"}


def test_tokens_per_expert_counts_match_router_stats():
    moe = MoE(small_cfg(capacity_factor=1.0)).train()
    x1, x2 = torch.randn(2, 8, 16), torch.randn(1, 5, 16)
    _, aux1 = moe(x1)
    _, aux2 = moe(x2)
    expected = aux1["router"]["tokens_per_expert"] + aux2["router"]["tokens_per_expert"]
    assert torch.equal(moe.tokens_per_expert, expected)
    kept = round(16 * 2 * (1 - aux1["router"]["dropped_fraction"]))
    assert int(aux1["router"]["tokens_per_expert"].sum()) == kept
    moe.eval()(x1)  # evaluation does not count
    assert torch.equal(moe.tokens_per_expert, expected)
    assert "tokens_per_expert" not in moe.state_dict()


def test_update_expert_bias_changes_the_bias_and_resets_the_counter():
    moe = MoE(small_cfg(bias_update_rate=1e-2)).train()
    moe(torch.randn(2, 8, 16))
    load = moe.tokens_per_expert.clone()
    moe.update_expert_bias()
    bias = moe.gate.e_score_correction_bias
    assert not torch.equal(bias, torch.zeros_like(bias))
    assert torch.all((bias > 0) == (load.float() < load.float().mean()))  # underloaded gain
    assert bias.sum().abs().item() < 1e-6  # zero-mean update
    assert torch.equal(moe.tokens_per_expert, torch.zeros_like(load))

    still = MoE(small_cfg(bias_update_rate=0.0)).train()
    still(torch.randn(2, 8, 16))
    still.update_expert_bias()
    assert torch.equal(still.gate.e_score_correction_bias, torch.zeros(6))


@pytest.mark.parametrize("changes", [dict(), dict(n_zero_experts=2, capacity_factor=1.0)])
def test_naive_and_sorted_layers_agree(changes):
    torch.manual_seed(0)
    naive = MoE(small_cfg(dispatch="naive", **changes))
    fast = MoE(small_cfg(dispatch="sorted", **changes))
    fast.load_state_dict(naive.state_dict())
    x = torch.randn(2, 7, 16)
    results = []
    for moe in (naive, fast):
        xi = x.clone().requires_grad_()
        y, _ = moe(xi)
        y.pow(2).sum().backward()
        results.append((y.detach(), xi.grad, moe.experts.gate_proj.grad, moe.gate.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bfloat16_layer_keeps_the_dtype():
    moe = MoE(small_cfg()).to(torch.bfloat16)
    y, _ = moe(torch.randn(1, 4, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert moe.tokens_per_expert.dtype == torch.long


def test_layer_runs_under_inference_mode_with_a_fresh_probe():
    from minimoe import moe as moe_module

    moe_module._probe_grouped_mm.cache_clear()
    layer = MoE(small_cfg())
    x = torch.randn(1, 6, 16)
    with torch.inference_mode():
        y, _ = layer(x)
        backend_inside = grouped_mm_backend("cpu", torch.float32, 16, 8)
    moe_module._probe_grouped_mm.cache_clear()
    assert backend_inside == grouped_mm_backend("cpu", torch.float32, 16, 8)  # not cached wrong
    torch.testing.assert_close(y, layer(x)[0])


def test_sorted_dispatch_under_autocast_whatever_the_probe_saw_first():
    # torch._grouped_mm is not on autocast's lists: bf16 rows and float32 weights must take
    # the loop backend, even after the (cached) bf16 probe ran outside autocast and said yes
    from minimoe.moe import grouped_mm_backend

    grouped_mm_backend("cpu", torch.bfloat16, 64, 32)  # the probe, cached, outside autocast
    gen = torch.Generator().manual_seed(3)
    experts = RoutedExperts(4, 64, 32)
    x = torch.randn(12, 64, generator=gen)
    topk_idx = torch.randint(0, 4, (12, 2), generator=gen)
    topk_weight = torch.rand(12, 2, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = torch.nn.functional.linear(x, torch.eye(64))  # bf16, as a previous layer leaves
        assert rows.dtype == torch.bfloat16
        got = dispatch_sorted(rows, topk_idx, topk_weight, experts)
        expected = dispatch_naive(rows, topk_idx, topk_weight, experts)
    # same bf16 products either way; summation order differs (bf16 has 8 bits of mantissa)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
