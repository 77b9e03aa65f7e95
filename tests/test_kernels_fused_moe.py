"""The fused MoE kernels (minimoe.kernels.fused_moe) against minimoe.moe.dispatch_naive, on the CPU.

The kernels run through Triton's interpreter (TRITON_INTERPRET set before triton is
imported; see tests/test_kernels_rmsnorm.py). The reference is the readable per-expert loop
``dispatch_naive`` differentiated by autograd: the output and the gradients of x,
topk_weight and the three expert weights are compared. float32 and float16 here (the
interpreter's bfloat16 tl.dot is wrong); bfloat16 only on a CUDA GPU.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported


import pytest  # noqa: E402
import torch  # noqa: E402
from triton_aot import compile_for_h100  # noqa: E402

pytest.importorskip("triton")

import minimoe  # noqa: E402
from minimoe import kernel_switch  # noqa: E402
from minimoe.experts import RoutedExperts  # noqa: E402
from minimoe.moe import dispatch_naive, dispatch_sorted  # noqa: E402

if not kernel_switch.triton_interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file alone",
                allow_module_level=True)

from minimoe.kernels.fused_moe import fused_moe  # noqa: E402

# max |kernel - reference| <= TOLERANCE * max |reference| per tensor; float16 is compared with
# a float32 reference on the same (float16) values, its intermediates round to 11 bits
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def routing(kind: str, N: int, k: int, E: int, gen: torch.Generator):
    """(topk_idx (N, k) long, topk_weight (N, k) float32); k distinct experts per token."""
    scores = torch.rand(N, E, generator=gen)
    if kind == "skewed":  # one expert takes most slots, the last ones none
        scores = scores * torch.linspace(1.0, 0.0, E).pow(4)
    elif kind == "sparse":  # only a few experts are ever chosen
        scores = scores * 1e-3
        scores[:, 1] += 1.0
        scores[:, E - 2] += 0.5
    topk_idx = scores.topk(k, dim=-1).indices  # (N, k)
    topk_weight = torch.rand(N, k, generator=gen) + 0.1  # (N, k) float32
    return topk_idx, topk_weight


def make_experts(E, C, I, dtype, gen):
    experts = RoutedExperts(E, C, I)
    with torch.no_grad():
        for weight in (experts.gate_proj, experts.up_proj, experts.down_proj):
            weight.copy_(torch.randn(weight.shape, generator=gen) / weight.shape[-1] ** 0.5)
    return experts.to(dtype)


def run(fn, x, topk_idx, topk_weight, experts, d_out, mask=None):
    """fn's output and the gradients (x, topk_weight, gate, up, down) for d_out."""
    experts.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    topk_weight = topk_weight.detach().clone().requires_grad_()
    out = fn(x, topk_idx, topk_weight, experts, mask)
    out.backward(d_out)
    return [out.detach(), x.grad, topk_weight.grad, experts.gate_proj.grad,
            experts.up_proj.grad, experts.down_proj.grad]


def kernel(x, topk_idx, topk_weight, experts, mask):
    return fused_moe(x, topk_idx, topk_weight, experts.gate_proj, experts.up_proj,
                     experts.down_proj, mask=mask)


def reference(x, topk_idx, topk_weight, experts, mask):
    return dispatch_naive(x, topk_idx, topk_weight, experts, mask=mask)


NAMES = ["out", "dx", "d topk_weight", "d gate_proj", "d up_proj", "d down_proj"]


def assert_close(got, want, dtype):
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, name
        scale = b.float().abs().max().clamp_min(1e-6)
        error = (a.float() - b.float()).abs().max()
        assert error <= TOLERANCE[dtype] * scale, f"{name}: error {float(error):.3g}, scale {float(scale):.3g}"


def compare(N, C, I, E, k, kind, dtype, mask_every=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts = make_experts(E, C, I, dtype, gen)
    x = torch.randn(N, C, generator=gen).to(dtype)
    topk_idx, topk_weight = routing(kind, N, k, E, gen)
    mask = None
    if mask_every is not None:
        mask = torch.ones(N, k, dtype=torch.bool)
        mask.view(-1)[::mask_every] = False
        topk_idx.masked_fill_(~mask, E)  # masked slots may name a non-existent expert
    d_out = torch.randn(N, C, generator=gen)
    got = run(kernel, x, topk_idx, topk_weight, experts, d_out, mask)
    reference_experts = make_experts(E, C, I, torch.float32, torch.Generator())
    reference_experts.load_state_dict({n: p.float() for n, p in experts.state_dict().items()})
    want = run(reference, x.float(), topk_idx, topk_weight, reference_experts, d_out, mask)
    assert got[0].dtype == torch.promote_types(dtype, torch.float32)
    assert got[1].dtype == dtype and got[3].dtype == dtype
    assert_close(got, want, dtype)
    return got, want


SHAPES = [
    # (N, C, I, E, k, routing)
    (1, 32, 16, 4, 1, "uniform"),  # one token, top-1
    (7, 32, 16, 4, 2, "uniform"),  # fewer slots than a block
    (7, 48, 24, 8, 3, "sparse"),  # most experts empty; C, I not multiples of the tiles
    (33, 64, 48, 8, 2, "uniform"),  # several blocks per expert, I not a multiple of 32
    (33, 40, 40, 8, 1, "skewed"),  # top-1, one dominant expert (a long segment), empty experts
    (33, 64, 32, 4, 3, "skewed"),
    (20, 144, 80, 4, 2, "uniform"),  # several tiles and inner steps along C and I (tiles of 64)
]


@pytest.mark.parametrize("N,C,I,E,k,kind", SHAPES)
def test_forward_and_backward_match_dispatch_naive_float32(N, C, I, E, k, kind):
    compare(N, C, I, E, k, kind, torch.float32)


@pytest.mark.parametrize("N,C,I,E,k,kind", [(33, 64, 48, 8, 2, "uniform"), (7, 32, 16, 4, 3, "skewed")])
def test_float16(N, C, I, E, k, kind):
    compare(N, C, I, E, k, kind, torch.float16)


def test_mask_skips_slots():
    """Masked slots (zero-computation experts, dropped slots) contribute nothing, get no gradient."""
    got, _ = compare(33, 32, 16, 4, 3, "uniform", torch.float32, mask_every=4)
    d_weight = got[2]
    assert (d_weight.view(-1)[::4] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 tl.dot needs a GPU")
def test_bfloat16_on_gpu():  # pragma: no cover - needs CUDA (and TRITON_INTERPRET unset)
    compare(64, 128, 96, 8, 2, "uniform", torch.bfloat16)


def test_matches_dispatch_sorted_and_needs_no_grad():
    gen = torch.Generator().manual_seed(1)
    experts = make_experts(8, 32, 16, torch.float32, gen)
    x = torch.randn(20, 32, generator=gen)
    topk_idx, topk_weight = routing("uniform", 20, 2, 8, gen)
    with torch.no_grad():
        out = kernel(x, topk_idx, topk_weight, experts, None)
        want = dispatch_sorted(x, topk_idx, topk_weight, experts)
    assert out.dtype == want.dtype and not out.requires_grad
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    gen = torch.Generator().manual_seed(2)
    experts = make_experts(4, 32, 16, torch.float32, gen)
    x = torch.randn(5, 32)
    topk_idx, topk_weight = routing("uniform", 5, 2, 4, gen)
    g, u, d = experts.gate_proj, experts.up_proj, experts.down_proj
    with pytest.raises(ValueError, match=r"expert indices .* \[0, 4\)"):
        fused_moe(x, topk_idx + 1, topk_weight, g, u, d)
    with pytest.raises(ValueError, match="down_proj"):
        fused_moe(x, topk_idx, topk_weight, g, u, d.transpose(1, 2))
    with pytest.raises(ValueError, match="gate_proj"):
        fused_moe(x, topk_idx, topk_weight, g.half(), u, d)
    with pytest.raises(ValueError, match="topk_weight"):
        fused_moe(x, topk_idx, topk_weight[:, :1], g, u, d)
    with pytest.raises(ValueError, match="mask"):
        fused_moe(x, topk_idx, topk_weight, g, u, d, mask=torch.ones(5, 2))
    with pytest.raises(ValueError, match="x must be one of .*float64"):  # tl.dot: no float64
        fused_moe(x.double(), topk_idx, topk_weight, g.double(), u.double(), d.double())


def test_no_tokens():
    gen = torch.Generator().manual_seed(4)
    experts = make_experts(4, 32, 16, torch.float32, gen)
    x = torch.zeros(0, 32, requires_grad=True)
    topk_weight = torch.zeros(0, 2, requires_grad=True)
    out = kernel(x, torch.zeros(0, 2, dtype=torch.long), topk_weight, experts, None)
    assert out.shape == (0, 32)
    out.sum().backward()
    assert x.grad.shape == (0, 32) and topk_weight.grad.shape == (0, 2)
    assert (experts.gate_proj.grad == 0).all() and (experts.down_proj.grad == 0).all()


def test_narrow_index_dtype_with_a_mask():
    """uint8 indices of 256 experts: the masked slots' index E = 256 does not fit uint8."""
    gen = torch.Generator().manual_seed(6)
    experts = make_experts(256, 32, 16, torch.float32, gen)
    x = torch.randn(5, 32, generator=gen)
    topk_idx, topk_weight = routing("uniform", 5, 2, 256, gen)
    mask = torch.tensor([[True, False]] * 5)
    with torch.no_grad():
        out = kernel(x, topk_idx.to(torch.uint8), topk_weight, experts, mask)
        want = dispatch_naive(x, topk_idx, topk_weight, experts, mask=mask)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_float64_model_runs_the_reference_dispatch():
    """dispatch_sorted hands the kernel only the dtypes tl.dot takes; float64 stays exact."""
    gen = torch.Generator().manual_seed(5)
    experts = make_experts(4, 32, 16, torch.float64, gen)
    x = torch.randn(9, 32, generator=gen, dtype=torch.float64)
    topk_idx, topk_weight = routing("uniform", 9, 2, 4, gen)
    with kernel_switch.use_kernels("triton"):
        out = dispatch_sorted(x, topk_idx, topk_weight, experts)
    want = dispatch_naive(x, topk_idx, topk_weight, experts)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Through the kernel switch: a Transformer with kernels="triton" runs the fused experts
# ------------------------------------------------------------------------------------------------
TINY = dict(num_hidden_layers=2, num_nextn_predict_layers=0, hidden_size=64,
            moe_intermediate_size=32, n_routed_experts=8, n_group=2, topk_group=1)


@pytest.mark.parametrize("extra", [{}, dict(n_zero_experts=2, capacity_factor=1.0)],
                         ids=["toy", "zero-experts+capacity"])
def test_model_with_triton_kernels_matches_reference(extra, kernels_used):
    results = []
    for kernels in ("reference", "triton"):
        torch.manual_seed(0)
        model = minimoe.Transformer(minimoe.ModelConfig.preset("toy", kernels=kernels, **TINY, **extra))
        ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
        out = model(ids, targets=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads))
    assert "fused_moe" in kernels_used
    (logits_ref, grads_ref), (logits, grads) = results
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    assert any("experts.gate_proj" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------
# The GPU compiler: the interpreter accepts code that the GPU compiler rejects
# ------------------------------------------------------------------------------------------------
COMPILE_FOR_H100 = """
    from minimoe.kernels import fused_moe, moe_align

    aligned = {"SORTED_IDS_ptr": "*i32", "EXPERT_IDS_ptr": "*i32", "NUM_POST_PAD_ptr": "*i32",
               "num_slots": "i32"}
    for p, block_m, block_k, precision in (("*bf16", 64, 64, "tf32"), ("*fp32", 16, 32, "ieee")):
        tiles = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, DOT_PRECISION=precision)
        compile_kernel(fused_moe._gate_up_kernel, dict(
            X_ptr=p, WG_ptr=p, WU_ptr=p, H_ptr=p, G_ptr=p, U_ptr=p, **aligned, top_k="i32",
            C="i32", I="i32"), dict(tiles, SAVE_PREACT=True))
        compile_kernel(fused_moe._down_kernel, dict(
            H_ptr=p, WD_ptr=p, WEIGHT_ptr="*fp32", Y_SLOT_ptr="*fp32", **aligned, C="i32",
            I="i32"), tiles)
        compile_kernel(fused_moe._down_backward_kernel, dict(
            DOUT_ptr="*fp32", WD_ptr=p, G_ptr=p, U_ptr=p, WEIGHT_ptr="*fp32", DG_ptr=p, DU_ptr=p,
            DW_PARTIAL_ptr="*fp32", **aligned, top_k="i32", C="i32", I="i32",
            num_i_tiles="i32"), tiles)
        compile_kernel(fused_moe._gate_up_backward_kernel, dict(
            DG_ptr=p, DU_ptr=p, WG_ptr=p, WU_ptr=p, DX_SLOT_ptr="*fp32", **aligned, C="i32",
            I="i32"), tiles)
        for a_ptr, by_token in ((p, False), ("*fp32", True)):  # dW_g / dW_u; dW_d
            compile_kernel(fused_moe._expert_weight_grad_kernel, dict(
                A_ptr=a_ptr, B_ptr=p, WEIGHT_ptr="*fp32", OUT_ptr=p, SORTED_IDS_ptr="*i32",
                EXPERT_START_ptr="*i32", EXPERT_END_ptr="*i32", num_slots="i32", top_k="i32",
                DA="i32", DB="i32"), dict(A_BY_TOKEN=by_token, B_BY_TOKEN=not by_token,
                SCALE_A=by_token, BLOCK_R=32, BLOCK_A=64, BLOCK_B=64, DOT_PRECISION=precision))
    compile_kernel(moe_align._count_kernel, dict(EXPERT_ptr="*i64", CHUNK_COUNTS_ptr="*i32",
                   num_slots="i32"), dict(CHUNK=128, E_PAD=256))
    compile_kernel(moe_align._offsets_kernel, dict(
        CHUNK_COUNTS_ptr="*i32", CHUNK_OFFSETS_ptr="*i32", EXPERT_START_ptr="*i32",
        EXPERT_END_ptr="*i32", EXPERT_IDS_ptr="*i32", NUM_POST_PAD_ptr="*i32", num_chunks="i32",
        num_experts="i32", block_m="i32", num_blocks="i32"), dict(E_PAD=256, BLOCK_B=128))
    compile_kernel(moe_align._scatter_kernel, dict(
        EXPERT_ptr="*i64", CHUNK_OFFSETS_ptr="*i32", EXPERT_START_ptr="*i32",
        SORTED_IDS_ptr="*i32", num_slots="i32", num_experts="i32"), dict(CHUNK=128, E_PAD=256),
        num_warps=8)
"""


def test_kernels_compile_for_an_h100_without_one():
    """The fused MoE (bf16 and float32 tiles) and the alignment kernels, compiled ahead of time
    to sm_90 machine code at DeepSeek-V3's 256 experts (triton ships ptxas): no GPU needed."""
    compile_for_h100(COMPILE_FOR_H100)
