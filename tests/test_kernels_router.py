"""The Triton router (minimoe.kernels.moe_router) against minimoe.router, on the CPU.

The kernels run through Triton's interpreter (TRITON_INTERPRET=1 set before triton is
imported; see tests/test_kernels_rmsnorm.py). The reference is minimoe.router's
``select_experts`` + ``gate_weights`` on torch's softmax / sigmoid, and its autograd
gradient. Inputs are continuous random numbers, so no two choice scores are equal; the
kernel's tie rule (lower expert index first) is checked on a hand case of its own.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported


import pytest  # noqa: E402
import torch  # noqa: E402
from triton_aot import compile_for_h100  # noqa: E402

pytest.importorskip("triton")

import minimoe  # noqa: E402
from minimoe import kernel_switch  # noqa: E402
from minimoe.router import Router, gate_weights, select_experts  # noqa: E402

if not kernel_switch.triton_interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file alone",
                allow_module_level=True)

from minimoe.kernels.moe_router import route  # noqa: E402

# (N, E, k, n_group, topk_group, group_score, norm_topk_prob, routed_scaling_factor):
# odd token counts, k = 1, groups with either group score, DeepSeek-V3's 256/8/4/8 shape
CASES = [
    (1, 8, 2, 1, 1, "top2_sum", True, 1.0),
    (7, 16, 1, 1, 1, "top2_sum", False, 1.0),
    (33, 64, 6, 8, 3, "max", False, 16.0),
    (7, 64, 6, 8, 3, "top2_sum", True, 2.5),
    (5, 256, 8, 8, 4, "top2_sum", True, 2.5),
    (3, 256, 8, 8, 4, "max", True, 1.0),
    (7, 16, 1, 4, 1, "max", True, 1.0),
    (9, 48, 4, 8, 3, "top2_sum", True, 2.5),  # 6 experts per group: padded groups
    (4, 24, 3, 1, 1, "top2_sum", False, 1.0),  # E not a power of two
]


def reference_route(logits, bias, k, n_group, topk_group, group_score, scoring_func, norm, rsf):
    """minimoe.router's steps, as Router.forward runs them."""
    scores = logits.softmax(dim=-1) if scoring_func == "softmax" else logits.sigmoid()
    idx = select_experts(scores.detach(), k, bias=bias, n_group=n_group, topk_group=topk_group,
                         group_score=group_score)
    weights = gate_weights(scores, idx, norm_topk_prob=norm, routed_scaling_factor=rsf)
    return idx, weights, scores


def random_inputs(N, E, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=gen) * 2  # (N, E)
    # a bias of the size the balancing update reaches: it changes many choices
    bias = torch.randn(E, generator=gen) * 0.2 if with_bias else None  # (E,)
    return logits, bias


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-E{c[1]}-k{c[2]}-g{c[3]}/{c[4]}-{c[5]}")
def test_forward_matches_reference(case, with_bias, scoring_func):
    N, E, k, n_group, topk_group, group_score, norm, rsf = case
    logits, bias = random_inputs(N, E, with_bias, seed=N * E + k)
    idx_ref, w_ref, s_ref = reference_route(logits, bias, k, n_group, topk_group, group_score,
                                            scoring_func, norm, rsf)
    idx, w, s = route(logits, bias, top_k=k, n_group=n_group, topk_group=topk_group,
                      group_score=group_score, scoring_func=scoring_func, norm_topk_prob=norm,
                      routed_scaling_factor=rsf)
    assert idx.dtype == torch.int64 and idx.shape == (N, k)
    assert w.dtype == torch.float32 and s.dtype == torch.float32 and s.shape == (N, E)
    # both order the k experts by decreasing biased score: the same list, position by position
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


def test_bias_steers_the_choice_and_group_limit_holds():
    """Not vacuous: with these inputs the bias and the group limit both change the answer."""
    logits, bias = random_inputs(33, 64, True, seed=1)
    args = dict(top_k=6, n_group=8, topk_group=3, scoring_func="sigmoid")
    with_bias, _, _ = route(logits, bias, **args)
    without, _, _ = route(logits, None, **args)
    ungrouped, _, _ = route(logits, bias, top_k=6, scoring_func="sigmoid")
    assert not torch.equal(with_bias, without)
    assert not torch.equal(with_bias, ungrouped)
    groups_used = (with_bias // 8).tolist()
    assert all(len(set(row)) <= 3 for row in groups_used)


def test_hand_cases_from_the_reference_tests():
    # V3's top-2 sum and V2's max choose different groups ([0.9, 0.1] vs [0.6, 0.6])
    scores = torch.tensor([[0.9, 0.1, 0.6, 0.6]])
    logits = torch.log(scores / (1 - scores))  # sigmoid(logits) = scores
    by_max, _, _ = route(logits, top_k=2, n_group=2, topk_group=1, group_score="max")
    by_sum, _, _ = route(logits, top_k=2, n_group=2, topk_group=1, group_score="top2_sum")
    assert sorted(by_max[0].tolist()) == [0, 1] and sorted(by_sum[0].tolist()) == [2, 3]
    # every biased score negative: the dropped group is masked with -inf, not 0
    scores = torch.tensor([[0.5, 0.4, 0.3, 0.2]])
    logits = torch.log(scores / (1 - scores))
    idx, w, _ = route(logits, torch.full((4,), -1.0), top_k=2, n_group=2, topk_group=1)
    assert idx[0].tolist() == [0, 1]
    torch.testing.assert_close(w[0], torch.tensor([0.5, 0.4]) / 0.9)  # unbiased, renormalised


def test_ties_go_to_the_lower_expert_index():
    # equal logits: every score ties; the kernel takes experts (and groups) in index order
    logits = torch.zeros(2, 16)
    idx, w, _ = route(logits, top_k=3, scoring_func="softmax", norm_topk_prob=False)
    assert idx.tolist() == [[0, 1, 2]] * 2
    torch.testing.assert_close(w, torch.full((2, 3), 1 / 16))
    idx, _, _ = route(logits, top_k=3, n_group=4, topk_group=2)
    assert idx.tolist() == [[0, 1, 2]] * 2
    # a group whose maximum appears twice: its top-2 sum counts it twice (as torch.topk)
    scores = torch.tensor([[0.7, 0.7, 0.1, 0.9, 0.45, 0.1]])  # sums 1.4 | 1.0 | 0.55
    logits = torch.log(scores / (1 - scores))
    idx, _, _ = route(logits, top_k=2, n_group=3, topk_group=1)
    assert sorted(idx[0].tolist()) == [0, 1]


def reference_and_kernel_grads(logits, bias, scoring_func, norm, rsf, **groups):
    """d logits for a random upstream gradient on both the weights and the scores."""
    gen = torch.Generator().manual_seed(7)
    k = groups["top_k"]
    d_weight = torch.randn(logits.shape[0], k, generator=gen, dtype=logits.dtype)
    d_scores = torch.randn(logits.shape, generator=gen, dtype=logits.dtype)
    ref_logits = logits.clone().requires_grad_()
    _, w_ref, s_ref = reference_route(ref_logits, bias, k, groups.get("n_group", 1),
                                      groups.get("topk_group", 1), "top2_sum", scoring_func,
                                      norm, rsf)
    torch.autograd.backward((w_ref, s_ref), (d_weight, d_scores))
    kernel_logits = logits.clone().requires_grad_()
    _, w, s = route(kernel_logits, bias, scoring_func=scoring_func, norm_topk_prob=norm,
                    routed_scaling_factor=rsf, **groups)
    torch.autograd.backward((w, s), (d_weight, d_scores))
    return ref_logits.grad, kernel_logits.grad


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm,rsf", [(True, 2.5), (False, 1.0)], ids=["renorm", "plain"])
def test_backward_matches_reference_autograd(scoring_func, norm, rsf):
    logits, bias = random_inputs(7, 64, True, seed=3)
    grad_ref, grad = reference_and_kernel_grads(logits, bias, scoring_func, norm, rsf,
                                                top_k=6, n_group=8, topk_group=3)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_backward_of_the_weights_alone():
    """The scores unused downstream (no gradient for them): d logits from the weights only."""
    logits, bias = random_inputs(5, 16, False, seed=4)
    ref = logits.clone().requires_grad_()
    _, w_ref, _ = reference_route(ref, None, 3, 1, 1, "top2_sum", "sigmoid", True, 2.5)
    (w_ref * torch.arange(3.0)).sum().backward()
    mine = logits.clone().requires_grad_()
    _, w, _ = route(mine, top_k=3, routed_scaling_factor=2.5)
    (w * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_gradcheck_float64(scoring_func):
    """The analytic backward kernel against finite differences (float64 kernels)."""
    logits, bias = random_inputs(2, 8, True, seed=5)
    logits = logits.double().requires_grad_()

    def gates_and_scores(u):
        _, w, s = route(u, bias, top_k=3, n_group=2, topk_group=1, scoring_func=scoring_func,
                        routed_scaling_factor=2.5)
        return w, s

    assert torch.autograd.gradcheck(gates_and_scores, (logits,), fast_mode=True)


def test_no_tokens():
    logits = torch.zeros(0, 16, requires_grad=True)
    idx, w, s = route(logits, torch.zeros(16), top_k=2, n_group=4, topk_group=2)
    assert idx.shape == (0, 2) and w.shape == (0, 2) and s.shape == (0, 16)
    (w.sum() + s.sum()).backward()
    assert logits.grad.shape == (0, 16)


def test_bad_input_is_rejected():
    logits = torch.randn(3, 16)
    with pytest.raises(ValueError, match="shape \\(N, E\\)"):
        route(logits[0], top_k=2)
    with pytest.raises(ValueError, match="float32"):
        route(logits.half(), top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        route(logits, top_k=17)
    with pytest.raises(ValueError, match="n_group=3"):
        route(logits, top_k=2, n_group=3)
    with pytest.raises(ValueError, match="fewer than top_k"):
        route(logits, top_k=5, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="bias"):
        route(logits, torch.zeros(8), top_k=2)
    with pytest.raises(ValueError, match="scoring_func"):
        route(logits, top_k=2, scoring_func="relu")


# ---------------------------------------------------------------------------------------------
# The kernel switch: Router.forward and a whole model with kernels="triton"
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["toy", "toy-classic", "deepseek-v3"])
def test_router_module_uses_the_kernel(preset, kernels_used):
    overrides = dict(hidden_size=32, n_routed_experts=64) if preset == "deepseek-v3" else {}
    cfg = minimoe.ModelConfig.preset(preset, **overrides)
    torch.manual_seed(0)
    router = Router(cfg)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(9, cfg.hidden_size)
    ref = router(x)
    grad_ref = torch.autograd.grad((ref.topk_weight * torch.arange(1.0, cfg.num_experts_per_tok + 1)).sum()
                                   + ref.scores.square().sum(), router.weight)[0]
    with kernel_switch.use_kernels("triton"):
        out = router(x)
    assert kernels_used == ["moe_router"]
    grad = torch.autograd.grad((out.topk_weight * torch.arange(1.0, cfg.num_experts_per_tok + 1)).sum()
                               + out.scores.square().sum(), router.weight)[0]
    assert torch.equal(out.topk_idx, ref.topk_idx)
    torch.testing.assert_close(out.topk_weight, ref.topk_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)


def test_toy_model_with_triton_router_matches_reference(kernels_used):
    torch.manual_seed(0)
    reference = minimoe.Transformer(minimoe.ModelConfig.preset("toy", num_hidden_layers=2))
    torch.manual_seed(0)
    fast = minimoe.Transformer(minimoe.ModelConfig.preset("toy", kernels="triton",
                                                          num_hidden_layers=2))
    ids = torch.randint(0, reference.cfg.vocab_size, (2, 7))
    results = []
    for model in (reference, fast):
        out = model(ids, targets=ids)
        out.loss.backward()
        results.append((out.logits.detach(), out.loss.detach(),
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert "moe_router" in kernels_used  # the router kernel really ran (with rmsnorm and rope)
    (logits_ref, loss_ref, grads_ref), (logits, loss, grads) = results
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# The GPU compiler: the interpreter accepts code that the GPU compiler rejects
# ---------------------------------------------------------------------------------------------

COMPILE_FOR_H100 = """
    from minimoe.kernels import moe_router

    forward = {"LOGITS_ptr": "*fp32", "logits_row_stride": "i32", "BIAS_ptr": "*fp32",
               "SCORES_ptr": "*fp32", "IDX_ptr": "*i64", "WEIGHT_ptr": "*fp32",
               "n_experts": "i32", "per_group": "i32", "routed_scaling_factor": "fp32"}
    for softmax, n_group in ((False, 8), (True, 1)):  # DeepSeek-V3; a softmax router
        compile_kernel(moe_router._router_forward_kernel, forward, dict(
            SOFTMAX=softmax, HAS_BIAS=True, N_GROUP=n_group, TOPK_GROUP=min(4, n_group),
            GROUP_TOP2=True, TOP_K=8, NORMALIZE=True, BLOCK_GROUPS=n_group,
            BLOCK_PER_GROUP=256 // n_group, BLOCK_K=8), num_warps=1)
    backward = {"dLOGITS_ptr": "*fp32", "SCORES_ptr": "*fp32", "dSCORES_ptr": "*fp32",
                "IDX_ptr": "*i64", "dWEIGHT_ptr": "*fp32", "n_experts": "i32",
                "routed_scaling_factor": "fp32"}
    for softmax in (False, True):
        compile_kernel(moe_router._router_backward_kernel, backward, dict(
            SOFTMAX=softmax, HAS_DSCORES=True, TOP_K=8, NORMALIZE=True, BLOCK_E=256, BLOCK_K=8),
            num_warps=1)
"""


def test_kernels_compile_for_an_h100_without_one():
    """Ahead-of-time compilation to sm_90 machine code (triton ships ptxas): no GPU needed."""
    compile_for_h100(COMPILE_FOR_H100)


def test_a_kernel_that_does_not_import_fails_the_compile_test_rather_than_skipping():
    """The helper skips only without triton: an ImportError in the kernel code is a failure."""
    with pytest.raises(AssertionError, match="ImportError"):
        compile_for_h100("from minimoe.kernels import no_such_kernel_module\n")
