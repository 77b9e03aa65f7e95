"""The Triton FP8 kernels (minimoe.kernels.fp8_quant, fp8_gemm) against minimoe.fp8, on the CPU.

The kernels run through Triton's interpreter, which must be chosen before triton is first
imported (see tests/test_kernels_rmsnorm.py): this module sets TRITON_INTERPRET=1 at the top
and skips when another import got to triton first.

The interpreter's own fp32 -> float8_e4m3fn cast rounds some values wrongly (a rounding carry
across a power of two is lost, subnormals are truncated); act_quant rounds to the e4m3 grid
itself before casting, so its FP8 values must equal torch's bit for bit, and so must the
scales (the fp32 scale is one float32 division in both).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from triton_aot import compile_for_h100  # noqa: E402

pytest.importorskip("triton")

from minimoe import fp8, kernel_switch  # noqa: E402

if not kernel_switch.triton_interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file alone",
                allow_module_level=True)

from minimoe.kernels.fp8_gemm import fp8_gemm  # noqa: E402
from minimoe.kernels.fp8_quant import act_quant, weight_dequant  # noqa: E402

# (..., K): one short row, K just past a tile edge, a partial second tile, leading dims
ACT_SHAPES = [(1, 100), (5, 200), (2, 3, 130), (4, 256), (3, 1)]
# (N, K): one block, partial blocks in either or both dims, a single row
WEIGHT_SHAPES = [(100, 60), (130, 200), (256, 129), (1, 256)]


def assert_same_fp8(q, q_ref):
    """Bit for bit, signed zeros included."""
    assert q.dtype == q_ref.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape
    different = q.view(torch.uint8) != q_ref.view(torch.uint8)
    assert not bool(different.any()), f"{int(different.sum())} of {q.numel()} values differ"


@pytest.mark.parametrize("scale_fmt", fp8.SCALE_FORMATS)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=str)
def test_act_quant_matches_reference(shape, scale_fmt):
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])  # magnitudes vary across tiles
    q, scale = act_quant(x, scale_fmt)
    q_ref, scale_ref = fp8.quantize_act_1x128(x, scale_fmt)
    assert scale.dtype == torch.float32 and scale.shape == scale_ref.shape
    assert torch.equal(scale, scale_ref)
    assert_same_fp8(q, q_ref)


def test_act_quant_ue8m0_rounds_up_one_ulp_above_a_power_of_two():
    """Row r's amax / 448 is 2^k exactly, or one float32 ulp above it: 2^k, or 2^(k+1)."""
    exponents = torch.tensor([-12.0, -8.0, 0.0, 5.0, 9.0])
    top = 448 * torch.exp2(exponents)  # (5,)
    x = torch.zeros(10, 128)
    x[0::2, 7] = top
    x[1::2, 7] = torch.nextafter(top, torch.full_like(top, float("inf")))
    _, scale = act_quant(x, "ue8m0")
    expected = torch.exp2(torch.stack([exponents, exponents + 1], dim=1).flatten())  # (10,)
    assert torch.equal(scale[:, 0], expected)
    assert torch.equal(scale, fp8.quantize_act_1x128(x, "ue8m0")[1])


def test_act_quant_rounds_every_e4m3_value_and_midpoint_like_torch():
    """Ties go to even, carries cross powers of two, subnormals round, 448 is kept.

    Each row holds 448 (so its scale is exactly 1) and then e4m3 values or the midpoints
    between neighbours, signed zeros included.
    """
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[torch.isfinite(values)].sort().values  # (254,) both zeros, +-2^-9 .. +-448
    midpoints = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, midpoints, torch.full((2,), 448.0)])  # (509,) -> (4, 127) + 1 col
    x = torch.cat([torch.full((4, 1), 448.0), x[:508].view(4, 127)], dim=1)  # (4, 128)
    q, scale = act_quant(x)
    q_ref, scale_ref = fp8.quantize_act_1x128(x)
    assert bool((scale == 1).all()) and torch.equal(scale, scale_ref)
    assert_same_fp8(q, q_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_act_quant_half_precision_input(dtype):
    x = torch.randn(3, 150).mul(20).to(dtype)
    q, scale = act_quant(x, "fp32")
    q_ref, scale_ref = fp8.quantize_act_1x128(x, "fp32")
    assert torch.equal(scale, scale_ref)
    assert_same_fp8(q, q_ref)


@pytest.mark.parametrize("scale_fmt", fp8.SCALE_FORMATS)
def test_act_quant_zero_rows_and_tiles(scale_fmt):
    """All-zero rows and tiles get the floored scale (1e-4 / 448, finite) and zero values."""
    x = torch.randn(4, 200)
    x[1] = 0.0
    x[2, 128:] = 0.0  # the second (partial) tile of row 2
    q, scale = act_quant(x, scale_fmt)
    _, scale_ref = fp8.quantize_act_1x128(x, scale_fmt)
    assert torch.equal(scale, scale_ref)  # floor / 448 is one float32 division in both
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (q[1].float() == 0).all() and (q[2, 128:].float() == 0).all()


def test_act_quant_strided_rows():
    """Rows with a gap between them (a column slice) are read in place."""
    base = torch.randn(6, 300)
    x = base[:, :170]
    q, scale = act_quant(x)
    q_ref, scale_ref = fp8.quantize_act_1x128(x.contiguous())
    assert torch.equal(scale, scale_ref)
    assert_same_fp8(q, q_ref)


def test_act_quant_checks_its_input():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        act_quant(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="scale_fmt"):
        act_quant(torch.zeros(2, 8), "e8m0")
    with pytest.raises(ValueError, match="unit stride"):
        act_quant(torch.zeros(8, 3).t())


@pytest.mark.parametrize("scale_fmt", fp8.SCALE_FORMATS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=str)
def test_weight_dequant_matches_reference(shape, scale_fmt):
    w = torch.randn(shape) * 0.02
    w[: min(shape[0], 128), : min(shape[1], 128)] *= 100  # blocks of different magnitude
    q, scale_inv = fp8.quantize_weight_128x128(w, scale_fmt)
    out = weight_dequant(q, scale_inv)
    assert out.dtype == torch.float32 and out.shape == w.shape
    # the same q and scale_inv: one float32 multiply per element in both, so exactly equal
    assert torch.equal(out, fp8.dequantize_weight_128x128(q, scale_inv))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_dequant_half_precision_output(dtype):
    q, scale_inv = fp8.quantize_weight_128x128(torch.randn(130, 70))
    out = weight_dequant(q, scale_inv, dtype=dtype)
    assert out.dtype == dtype
    # the interpreter's float32 -> bfloat16 cast is not round-to-nearest: one ulp apart
    torch.testing.assert_close(out, fp8.dequantize_weight_128x128(q, scale_inv).to(dtype))


def test_weight_dequant_smaller_block():
    """block is a parameter: 64x64 blocks need a (ceil(N/64), ceil(K/64)) scale."""
    q = torch.randn(100, 70).clamp(-400, 400).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(2, 2) + 0.5
    full = scale_inv.repeat_interleave(64, 0).repeat_interleave(64, 1)[:100, :70]
    assert torch.equal(weight_dequant(q, scale_inv, block=64), q.float() * full)


def test_weight_dequant_checks_its_input():
    q, s = fp8.quantize_weight_128x128(torch.randn(130, 70))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        weight_dequant(q.float(), s)
    with pytest.raises(ValueError, match="float32"):
        weight_dequant(q, s.double())
    with pytest.raises(ValueError, match=r"ceil\(N/128\)"):
        weight_dequant(q, s[:1])
    with pytest.raises(ValueError, match="contiguous"):
        weight_dequant(q.t().contiguous().t(), s)  # (130, 70) with column-major strides
    with pytest.raises(ValueError, match="2-D"):
        weight_dequant(q[0], s)


# ----------------------------------------------------------------------------- the GEMM
# (M, K, N): partial K blocks, partial N blocks, one row, exact multiples of 128
GEMM_SHAPES = [(16, 130, 200), (1, 128, 256), (37, 256, 100), (5, 60, 129), (70, 200, 17)]


def quantised_operands(M, K, N, scale_fmt="fp32"):
    a = torch.randn(M, K) * torch.logspace(-2, 2, K)  # K blocks of different magnitude
    w = torch.randn(N, K) * 0.05
    w[: min(N, 128)] *= 30  # weight blocks of different magnitude along N
    a_q, a_scale = fp8.quantize_act_1x128(a, scale_fmt)
    w_q, w_scale = fp8.quantize_weight_128x128(w, scale_fmt)
    return a_q, a_scale, w_q, w_scale


def assert_close_to_reference(y, a_q, a_scale, w_q, w_scale):
    """Both sum the same float32 products in another order: relative to sum |a_k w_k|."""
    y_ref = fp8.fp8_matmul_reference(a_q, a_scale, w_q, w_scale)  # promotion every 128, fp32
    magnitude = (fp8.dequantize_act_1x128(a_q, a_scale).abs()
                 @ fp8.dequantize_weight_128x128(w_q, w_scale).abs().T)  # (M, N)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    err = (y - y_ref).abs()
    assert bool((err <= 1e-5 * magnitude + 1e-30).all()), f"max err {(err / magnitude).max()}"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())


@pytest.mark.parametrize("scale_fmt", fp8.SCALE_FORMATS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=str)
def test_fp8_gemm_matches_reference(shape, scale_fmt):
    M, K, N = shape
    operands = quantised_operands(M, K, N, scale_fmt)
    assert_close_to_reference(fp8_gemm(*operands), *operands)


def test_fp8_gemm_after_act_quant_with_leading_dims():
    """The inference path: act_quant a (B, T, K) activation, multiply by a stored FP8 weight."""
    x = torch.randn(2, 3, 150)
    w_q, w_scale = fp8.quantize_weight_128x128(torch.randn(40, 150) * 0.1)
    x_q, x_scale = act_quant(x)
    y = fp8_gemm(x_q, x_scale, w_q, w_scale)
    assert y.shape == (2, 3, 40)
    assert_close_to_reference(y.view(6, 40), x_q.view(6, 150), x_scale.view(6, 2), w_q, w_scale)


def test_fp8_gemm_promotes_each_k_block_separately():
    """Each K block has its own scale: a block scaled by 2^10 must not swamp the others'."""
    a_q = torch.ones(16, 256).to(torch.float8_e4m3fn)
    w_q = torch.ones(8, 256).to(torch.float8_e4m3fn)
    a_scale = torch.tensor([[1024.0, 1.0]]).repeat(16, 1)
    w_scale = torch.tensor([[1.0, 3.0]])
    y = fp8_gemm(a_q, a_scale, w_q, w_scale)
    assert torch.equal(y, torch.full((16, 8), 128 * 1024.0 + 128 * 3.0))


def test_fp8_gemm_zero_rows():
    a_q, a_scale, w_q, w_scale = quantised_operands(4, 130, 9)
    y = fp8_gemm(a_q[:0], a_scale[:0], w_q, w_scale)
    assert y.shape == (0, 9)


def test_fp8_gemm_checks_its_input():
    a_q, a_scale, w_q, w_scale = quantised_operands(4, 130, 9)
    with pytest.raises(ValueError, match="a_q must be a torch.float8_e4m3fn"):
        fp8_gemm(a_q.float(), a_scale, w_q, w_scale)
    with pytest.raises(ValueError, match="must share K"):
        fp8_gemm(a_q, a_scale, w_q[:, :129].contiguous(), w_scale)
    with pytest.raises(ValueError, match="a_scale must have shape"):
        fp8_gemm(a_q, a_scale[:, :1].contiguous(), w_q, w_scale)
    with pytest.raises(ValueError, match="w_scale_inv must have shape"):
        fp8_gemm(a_q, a_scale, w_q, a_scale)
    with pytest.raises(ValueError, match="contiguous"):
        fp8_gemm(a_q, a_scale, w_q.t().contiguous().t(), w_scale)


# ----------------------------------------------------------------------------- wired into minimoe.fp8
@pytest.mark.parametrize("shape", [(100, 130, 70), (8, 256, 1), (33, 20, 150)], ids=str)
def test_fp8_gemm_with_row_tiled_second_operand(shape):
    """Wgrad's product dy^T @ x: both operands in 1x128 tiles along the tokens (per-row scales)."""
    N, M, K = shape  # dW (N, K) = dy^T (N, M) @ x (M, K): the reduction runs over M tokens
    dy_t = torch.randn(N, M) * torch.logspace(-1, 1, M)
    x_t = torch.randn(K, M) * torch.logspace(1, -1, K)[:, None]  # rows of different magnitude
    gt_q, gt_s = fp8.quantize_act_1x128(dy_t)
    xt_q, xt_s = fp8.quantize_act_1x128(x_t)
    y = fp8_gemm(gt_q, gt_s, xt_q, xt_s)
    y_ref = fp8.fp8_matmul_reference(gt_q, gt_s, xt_q, xt_s)
    magnitude = (fp8.dequantize_act_1x128(gt_q, gt_s).abs()
                 @ fp8.dequantize_act_1x128(xt_q, xt_s).abs().T)  # (N, K)
    assert y.shape == (N, K)
    assert bool(((y - y_ref).abs() <= 1e-5 * magnitude + 1e-30).all())


class CallCounter:
    """Wrap a kernel entry point and count its calls (the switch looks it up at call time)."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.fixture
def counted_kernels(monkeypatch):
    from minimoe.kernels import fp8_gemm as gemm_module
    from minimoe.kernels import fp8_quant as quant_module

    quant = CallCounter(quant_module.act_quant)
    gemm = CallCounter(gemm_module.fp8_gemm)
    monkeypatch.setattr(quant_module, "act_quant", quant)
    monkeypatch.setattr(gemm_module, "fp8_gemm", gemm)
    return quant, gemm


def _linear_run(layer, x, grad, kernels):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    with kernel_switch.use_kernels(kernels):
        y = layer(x)
    y.backward(grad)  # outside the choice: the backward must remember it
    return y.detach(), x.grad, layer.weight.grad.clone()


# (in, out): two K tiles, the second partial; one partial tile. Small: in the interpreter
# every 1x128 tile is one program, and Wgrad quantises x^T, in_features rows of them.
@pytest.mark.parametrize("scale_fmt,features", [("fp32", (130, 24)), ("ue8m0", (60, 24))])
def test_fp8_linear_kernel_path_matches_reference(scale_fmt, features, counted_kernels):
    torch.manual_seed(0)
    layer = fp8.Fp8Linear(*features, scale_fmt)
    x = torch.randn(2, 3, features[0])
    grad = torch.randn(2, 3, features[1])
    reference = _linear_run(layer, x, grad, "reference")
    assert counted_kernels[0].calls == counted_kernels[1].calls == 0
    triton_run = _linear_run(layer, x, grad, "triton")
    # Fprop: 1 act_quant + 1 GEMM; Dgrad: 1 + 1; Wgrad: 2 + 1
    assert counted_kernels[0].calls == 4 and counted_kernels[1].calls == 3
    for got, want in zip(triton_run, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_fp8_linear_e5m2_gradients_take_the_reference_path(counted_kernels):
    torch.manual_seed(0)
    layer = fp8.Fp8Linear(130, 16, grad_fmt="e5m2")
    x, grad = torch.randn(6, 130), torch.randn(6, 16)
    reference = _linear_run(layer, x, grad, "reference")
    triton_run = _linear_run(layer, x, grad, "triton")
    assert counted_kernels[1].calls == 1  # Fprop only: e5m2 operands have no kernel here
    for got, want in zip(triton_run, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_fp8_grouped_product_kernel_path_matches_reference(counted_kernels):
    torch.manual_seed(0)
    sizes = [5, 0, 12, 3]
    rows = torch.randn(sum(sizes), 40)
    weight = torch.randn(4, 16, 40) * 0.05
    grad = torch.randn(sum(sizes), 16)
    results = []
    for kernels in ("reference", "triton"):
        r, w = rows.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with kernel_switch.use_kernels(kernels):
            y = fp8.fp8_grouped_linear(r, sizes, w)
        y.backward(grad)
        results.append((y.detach(), r.grad, w.grad))
    assert counted_kernels[1].calls == 4 + 4 + 3  # Fprop and Dgrad per expert, Wgrad per non-empty
    for got, want in zip(*results[::-1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_fp8_linear_kernel_path_non_finite_input_gives_nan():
    """The kernels do not check (no extra pass, no host sync): a NaN or inf in a row makes
    that row's output NaN -- a diverged step still shows -- and leaves the other rows alone.
    The reference path raises instead."""
    layer = fp8.Fp8Linear(130, 20)
    x = torch.randn(4, 130)
    layer.requires_grad_(False)
    for bad in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[1, 5] = bad
        with kernel_switch.use_kernels("triton"):
            y = layer(x_bad)
        assert bool(torch.isnan(y[1]).all())
        torch.testing.assert_close(y[[0, 2, 3]], layer(x[[0, 2, 3]]), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="NaN or inf"):
            layer(x_bad)


def test_fp8_toy_layer_under_triton_switch(counted_kernels):
    """A converted MoE model: the choice the model sets reaches its FP8 GEMMs (forward only;
    the backward's use of the choice is tested on Fp8Linear above, at a lower interpreter cost)."""
    from minimoe.config import ModelConfig
    from minimoe.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset("toy", num_hidden_layers=1, first_k_dense_replace=0,
                             num_nextn_predict_layers=0, hidden_size=32, num_attention_heads=2,
                             q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                             qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_group=1,
                             topk_group=1, moe_intermediate_size=16)
    model = Transformer(cfg).eval()
    fp8.convert_to_fp8(model)
    ids = torch.randint(0, 256, (1, 4))
    logits = []
    for kernels in ("reference", "triton"):
        model.kernels = model.layers[0].kernels = kernels
        with torch.no_grad():
            logits.append(model(ids).logits)
    # q, kv_a, kv_b, o + shared gate, up, down + 4 experts x 3 (the empty ones too)
    assert counted_kernels[1].calls == 4 + 3 + 4 * 3
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("amax_floor", [fp8.GRAD_AMAX_FLOOR, 1e-4])
def test_act_quant_amax_floor_matches_reference(amax_floor):
    """Tiny rows (gradient-like): the scale follows the tile down to the floor, as in torch."""
    x = torch.randn(6, 200) * torch.logspace(-12, -2, 6)[:, None]
    q, scale = act_quant(x, amax_floor=amax_floor)
    q_ref, scale_ref = fp8.quantize_act_1x128(x, amax_floor=amax_floor)
    assert torch.equal(scale, scale_ref)
    assert_same_fp8(q, q_ref)
    with pytest.raises(ValueError, match="amax_floor"):
        act_quant(x, amax_floor=0.0)


def test_act_quant_non_finite_tile_gets_a_nan_scale():
    """Documented behaviour on the kernel path: only the tile holding the NaN / inf is marked."""
    x = torch.randn(3, 300)
    x[1, 140] = float("nan")
    x[2, 5] = float("-inf")
    _, scale = act_quant(x)
    expected = torch.zeros(3, 3, dtype=torch.bool)
    expected[1, 1] = expected[2, 0] = True
    assert torch.equal(torch.isnan(scale), expected)


# ----------------------------------------------------------------------------- the GPU compiler
# The interpreter accepts code the GPU compiler may reject (a NaN constant, an fp8 tl.dot):
# compile every kernel variant ahead of time to sm_90 machine code (triton ships ptxas).
COMPILE_FOR_H100 = """
    from minimoe.kernels import fp8_gemm, fp8_quant

    for x_type in ("*bf16", "*fp32"):
        for ue8m0 in (False, True):
            compile_kernel(fp8_quant._act_quant_kernel, {
                "X_ptr": x_type, "X_row_stride": "i32", "Q_ptr": "*fp8e4nv", "S_ptr": "*fp32",
                "n_cols": "i32", "n_tiles": "i32", "fp8_max": "fp32", "amax_floor": "fp32"},
                dict(UE8M0=ue8m0, BLOCK_SIZE=128))
    compile_kernel(fp8_quant._weight_dequant_kernel, {
        "Q_ptr": "*fp8e4nv", "S_ptr": "*fp32", "W_ptr": "*bf16", "n_rows": "i32", "n_cols": "i32",
        "n_col_blocks": "i32"}, dict(BLOCK_SIZE=128))
    for rows in (128, 1):
        compile_kernel(fp8_gemm._fp8_gemm_kernel, {
            "A_ptr": "*fp8e4nv", "A_scale_ptr": "*fp32", "W_ptr": "*fp8e4nv", "W_scale_ptr": "*fp32",
            "Y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "n_k_blocks": "i32"},
            dict(W_SCALE_ROWS=rows, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128))
"""


def test_fp8_kernels_compile_for_an_h100_without_one():
    compile_for_h100(COMPILE_FOR_H100)
