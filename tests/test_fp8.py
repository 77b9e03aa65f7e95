"""FP8 quantisation, the simulated FP8 GEMM and Fp8Linear (minimoe.fp8)."""

import math

import pytest
import torch
import torch.nn.functional as F

from minimoe import fp8
from minimoe.fp8 import (Fp8Linear, dequantize_act_1x128, dequantize_per_tensor,
                         dequantize_weight_128x128, fp8_matmul_reference, quantize_act_1x128,
                         quantize_per_tensor, quantize_weight_128x128, round_mantissa)

E4M3 = torch.float8_e4m3fn
U = 2.0 ** -4  # unit roundoff of e4m3 (3 mantissa bits): half an ulp, relative


# ----------------------------------------------------------------------------- format facts
def test_format_facts():
    info = torch.finfo(E4M3)
    assert info.max == 448.0 == fp8.FP8_MAX == 1.75 * 2 ** 8
    assert info.eps == 2 ** -3 and info.smallest_normal == 2 ** -6
    assert torch.finfo(torch.float8_e5m2).max == 57344.0 == 1.75 * 2 ** 15
    assert torch.finfo(torch.float8_e5m2).eps == 2 ** -2
    # Every e4m3fn bit pattern: 8 values per binade, one NaN pattern per sign, no inf.
    values = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    assert int(torch.isnan(values).sum()) == 2 and not bool(torch.isinf(values).any())
    finite = values[torch.isfinite(values)]
    assert finite.max() == 448.0 and finite[finite > 0].min() == 2 ** -9
    binade = finite[(finite >= 1) & (finite < 2)].sort().values
    assert torch.equal(binade, 1 + torch.arange(8) / 8)  # spacing 2^-3 in [1, 2)
    top = finite[(finite >= 256)].sort().values
    assert torch.equal(top, 256 + 32 * torch.arange(7).float())  # spacing 32 near the top
    # torch's cast saturates (even inf) to 448: the reason the quantisers refuse inf.
    assert torch.tensor([1e6, float("inf")]).to(E4M3).float().tolist() == [448.0, 448.0]


def _half_ulp_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|x - dequant(quant(x))| <= half an ulp of x/scale in e4m3, times the scale (independent)."""
    y = (x / scale).abs()
    exponent = torch.floor(torch.log2(y.clamp_min(2 ** -6)))  # subnormals share 2^-6's ulp
    return 0.5 * torch.exp2(exponent - 3) * scale * (1 + 1e-6)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("shape", [(4, 128), (3, 5, 300), (7, 1), (2, 257)])
def test_act_1x128_round_trip(shape, scale_fmt):
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])  # many binades along K
    q, scale = quantize_act_1x128(x, scale_fmt)
    assert q.dtype == E4M3 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], math.ceil(shape[-1] / 128))
    full = scale.repeat_interleave(128, dim=-1)[..., : shape[-1]]
    err = (dequantize_act_1x128(q, scale) - x).abs()
    assert bool((err <= _half_ulp_bound(x, full)).all())
    assert (q.float().abs().amax() <= 448)
    if scale_fmt == "fp32":  # the tile's amax lands exactly on 448
        tiles_max = q.float().abs().amax(dim=-1)
        assert bool((tiles_max == 448).any())


def test_ue8m0_scales_are_powers_of_two():
    x = torch.randn(16, 1000) * 37.0
    _, scale = quantize_act_1x128(x, "ue8m0")
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    _, scale_inv = quantize_weight_128x128(torch.randn(300, 200) * 0.02, "ue8m0")
    mantissa, _ = torch.frexp(scale_inv)
    assert bool((mantissa == 0.5).all())
    # rounded up: never smaller than amax / 448, never twice as large
    amax = x.view(16, -1)[:, :896].reshape(16, 7, 128).abs().amax(-1)
    assert bool((scale[:, :7] >= amax / 448).all() and (scale[:, :7] < 2 * amax / 448).all())


@pytest.mark.parametrize("exponent", [-12, -8, 0, 5, 9])
def test_ue8m0_rounds_up_just_above_a_power_of_two(exponent):
    """amax / 448 one float32 ulp above 2^k must give 2^(k+1); exactly 2^k gives 2^k.

    (A float32 log2 of such a scale rounds to exactly k for most k, so ceil(log2) would
    round it down.)"""
    top = torch.tensor(448 * 2.0 ** exponent)
    x = torch.zeros(2, 128)
    x[0, 3] = torch.nextafter(top, torch.tensor(float("inf")))  # amax / 448 = 2^k (1 + 2^-23)
    x[1, 3] = top
    q, scale = quantize_act_1x128(x, "ue8m0")
    assert scale[:, 0].tolist() == [2.0 ** (exponent + 1), 2.0 ** exponent]
    assert q[0, 3].float().item() == 224.0 and q[1, 3].float().item() == 448.0
    _, scale_inv = quantize_weight_128x128(x[:1], "ue8m0")
    assert scale_inv.item() == 2.0 ** (exponent + 1)


@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_weight_128x128_edge_blocks(scale_fmt):
    w = torch.randn(300, 200) * 0.02
    w[256:, 128:] *= 100  # the corner edge block gets its own scale
    q, scale_inv = quantize_weight_128x128(w, scale_fmt)
    assert q.shape == (300, 200) and scale_inv.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            block = w[128 * i: 128 * (i + 1), 128 * j: 128 * (j + 1)]
            expected = block.abs().max() / 448
            if scale_fmt == "ue8m0":
                expected = 2.0 ** math.ceil(math.log2(expected))
            assert scale_inv[i, j].item() == pytest.approx(float(expected), rel=1e-6)
    full = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    err = (dequantize_weight_128x128(q, scale_inv) - w).abs()
    assert bool((err <= _half_ulp_bound(w, full)).all())


def test_per_tensor_round_trip():
    x = torch.randn(50, 70)
    q, scale = quantize_per_tensor(x)
    assert scale.shape == () and scale.item() == pytest.approx(x.abs().max().item() / 448)
    err = (dequantize_per_tensor(q, scale) - x).abs()
    assert bool((err <= _half_ulp_bound(x, scale)).all())


def test_non_contiguous_input_matches_contiguous():
    x = torch.randn(300, 64)
    q1, s1 = quantize_act_1x128(x.T)
    q2, s2 = quantize_act_1x128(x.T.contiguous())
    assert torch.equal(q1.float(), q2.float()) and torch.equal(s1, s2) and q1.is_contiguous()
    w1 = quantize_weight_128x128(x.T)
    w2 = quantize_weight_128x128(x.T.contiguous())
    assert torch.equal(w1[0].float(), w2[0].float()) and torch.equal(w1[1], w2[1])


def test_low_precision_inputs_accepted():
    x = torch.randn(4, 256)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        q, scale = quantize_act_1x128(x.to(dtype))
        ref_q, ref_s = quantize_act_1x128(x.to(dtype).float())
        assert torch.equal(q.float(), ref_q.float()) and torch.equal(scale, ref_s)


# ----------------------------------------------------------------------------- bad inputs
def test_all_zero_block_uses_the_floor():
    x = torch.randn(2, 384)
    x[0, 128:256] = 0
    q, scale = quantize_act_1x128(x)
    assert scale[0, 1].item() == pytest.approx(1e-4 / 448)
    assert bool((q[0, 128:256].float() == 0).all())
    w = torch.zeros(130, 10)
    qw, sw = quantize_weight_128x128(w, "ue8m0")
    assert bool((qw.float() == 0).all()) and sw.shape == (2, 1)
    assert torch.equal(sw, torch.full((2, 1), 2.0 ** math.ceil(math.log2(1e-4 / 448))))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_raise(bad):
    x = torch.randn(3, 200)
    x[1, 150] = bad
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        quantize_act_1x128(x)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        quantize_per_tensor(x)
    with pytest.raises(ValueError, match="w contains NaN or inf"):
        quantize_weight_128x128(x)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, E4M3])
def test_unsupported_dtypes_raise(dtype):
    x = torch.ones(2, 128).to(dtype)
    with pytest.raises(ValueError, match="x must be float32, bfloat16, float16 or float64"):
        quantize_act_1x128(x)
    with pytest.raises(ValueError, match="w must be float32"):
        quantize_weight_128x128(x)


def test_bad_arguments_raise():
    x = torch.randn(4, 256)
    with pytest.raises(ValueError, match="scale_fmt"):
        quantize_act_1x128(x, "e8m0")
    with pytest.raises(ValueError, match="w must be a 2-D"):
        quantize_weight_128x128(torch.randn(2, 3, 4))
    q, s = quantize_act_1x128(x)
    with pytest.raises(ValueError, match="scale must have shape"):
        dequantize_act_1x128(q, s[:, :1])
    with pytest.raises(ValueError, match="q must be a float8_e4m3fn"):
        dequantize_act_1x128(x, s)
    with pytest.raises(ValueError, match="scale must be a float32"):
        dequantize_act_1x128(q, s.double())
    wq, ws = quantize_weight_128x128(torch.randn(8, 128))
    with pytest.raises(ValueError, match="must share K"):
        fp8_matmul_reference(q, s, wq, ws)
    with pytest.raises(ValueError, match="accumulator bits"):
        round_mantissa(x, 30)


# ----------------------------------------------------------------------------- the GEMM
def _error_bound(a, w, a_scale_full, w_scale_full):
    """|y - a w^T| <= sum_k |a_k w_k| (2u + u^2) + subnormal terms (rigorous, independent)."""
    abs_err_a = _half_ulp_bound(a, a_scale_full)
    abs_err_w = _half_ulp_bound(w, w_scale_full)
    return (abs_err_a @ w.abs().T + a.abs() @ abs_err_w.T + abs_err_a @ abs_err_w.T) * 1.001 + 1e-5


@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_fp8_matmul_vs_fp32(scale_fmt):
    a, w = torch.randn(33, 300), torch.randn(70, 300) * 0.05
    a_q, a_s = quantize_act_1x128(a, scale_fmt)
    w_q, w_s = quantize_weight_128x128(w, scale_fmt)
    y = fp8_matmul_reference(a_q, a_s, w_q, w_s)
    ref = a @ w.T
    a_full = a_s.repeat_interleave(128, -1)[:, :300]
    w_full = w_s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:70, :300]
    assert bool(((y - ref).abs() <= _error_bound(a, w, a_full, w_full)).all())
    # statistically: about 2.5% RMS per operand -> ~3.5% relative, far below the 12.9% bound
    assert ((y - ref).norm() / ref.norm()).item() < 0.06
    # exactly the float32 product of the dequantised operands
    exact = dequantize_act_1x128(a_q, a_s) @ dequantize_weight_128x128(w_q, w_s).T
    torch.testing.assert_close(y, exact)
    # full-precision accumulator (23 bits) == float32 accumulation, up to summation order
    y23 = fp8_matmul_reference(a_q[:4], a_s[:4], w_q, w_s, accumulator_bits=23)
    torch.testing.assert_close(y23, exact[:4], rtol=1e-5, atol=1e-5)


def test_round_mantissa():
    # 10 mantissa bits: the ulp is 2^-10 in [1, 2) and 2^-9 in [2, 4)
    x = torch.tensor([1.0 + 2 ** -10 + 2 ** -12, -3.0 - 2 ** -10, 1.0 - 2 ** -20])
    assert round_mantissa(x, 10, "truncate").tolist() == [1.0 + 2 ** -10, -3.0, 1.0 - 2 ** -11]
    assert round_mantissa(x, 10, "nearest").tolist() == [1.0 + 2 ** -10, -3.0 - 2 ** -9, 1.0]


def test_limited_accumulation_grows_with_k_promotion_bounds_it():
    torch.manual_seed(1)
    errors = {}
    for K in (128, 2048):
        a, w = torch.randn(16, K), torch.randn(16, K)
        a_q, a_s = quantize_act_1x128(a)
        w_q, w_s = quantize_weight_128x128(w)
        exact = (dequantize_act_1x128(a_q, a_s).double()
                 @ dequantize_weight_128x128(w_q, w_s).double().T)
        for promote in (None, 128):
            y = fp8_matmul_reference(a_q, a_s, w_q, w_s, promote_every=promote,
                                     accumulator_bits=14)
            errors[K, promote] = ((y.double() - exact).norm() / exact.norm()).item()
    # one interval of 128: promotion changes nothing
    assert errors[128, None] == pytest.approx(errors[128, 128])
    # without promotion the (truncating) 14-bit accumulator drifts with K ...
    assert errors[2048, None] > 5 * errors[128, None] and errors[2048, None] > 0.01
    # ... with promotion every 128 the error stays at the one-interval level
    assert errors[2048, 128] < 2 * errors[128, 128] and errors[2048, 128] < 0.005


# ----------------------------------------------------------------------------- Fp8Linear
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_fp8_linear_forward_backward(scale_fmt):
    linear = torch.nn.Linear(200, 150, bias=False)
    layer = Fp8Linear.from_linear(linear, scale_fmt)
    x = torch.randn(3, 60, 200, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = F.linear(x_ref, linear.weight)
    assert y.shape == (3, 60, 150) and y.dtype == x.dtype
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # each GEMM: two e4m3 operands, ~2.5% RMS relative error each -> a few % overall
    assert rel(y, y_ref) < 0.06
    assert rel(x.grad, x_ref.grad) < 0.06
    assert rel(layer.weight.grad, linear.weight.grad) < 0.06
    assert layer.weight.grad.dtype == torch.float32


def test_fp8_linear_bf16_input_and_shape_check():
    layer = Fp8Linear(130, 20)
    x = torch.randn(5, 130, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="in_features=130"):
        layer(torch.randn(5, 129))


def test_per_tensor_scaling_fails_on_outliers():
    """One outlier channel: per-tensor scaling flushes ordinary activations; 1x128 does not.

    e4m3 spans ~18 binades, so the outlier must be large (here 1e5 x) before per-tensor
    scaling pushes unit-scale values into the subnormals (see the module docstring).
    """
    x = torch.randn(64, 512)
    x[:, 7] *= 1e5  # outlier channel, in the first tile only
    w = torch.randn(96, 512) * 0.05
    ref = x[:, 128:] @ w[:, 128:].T  # the output of the non-outlier channels

    def rel(y):
        return ((y - ref).norm() / ref.norm()).item()

    w_q, w_s = quantize_weight_128x128(w)
    w_deq = dequantize_weight_128x128(w_q, w_s)[:, 128:]
    q, s = quantize_per_tensor(x)
    per_tensor = rel(dequantize_per_tensor(q, s)[:, 128:] @ w_deq.T)
    q, s = quantize_act_1x128(x)
    tiled = rel(dequantize_act_1x128(q, s)[:, 128:] @ w_deq.T)
    assert tiled < 0.06 and per_tensor > 5 * tiled


def test_experiment_runs_small(tmp_path):
    from minimoe.experiments import fp8_accumulation

    out = tmp_path / "fp8.json"
    assert fp8_accumulation.main(["--k", "128", "512", "--m", "8", "--n", "8", "--seeds", "1",
                                  "--out", str(out), "--figure-dir", str(tmp_path)]) == 0
    import json

    results = json.loads(out.read_text())
    series = results["accumulation"]["variants"]["14-bit truncating, no promotion"]
    assert series[1]["relative"]["mean"] > series[0]["relative"]["mean"]
    assert (tmp_path / "fp8_accumulation.png").exists()
    assert (tmp_path / "fp8_scaling_error.png").exists()


# ----------------------------------------------------------------------------- e5m2
E5M2 = torch.float8_e5m2


def test_e5m2_format_facts():
    """Every e5m2 bit pattern: IEEE-style (inf and NaNs), 4 values per binade, 57344 on top."""
    values = torch.arange(256, dtype=torch.uint8).view(E5M2).float()
    assert int(torch.isinf(values).sum()) == 2 and int(torch.isnan(values).sum()) == 6
    finite = values[torch.isfinite(values)]
    assert finite.max() == 57344.0 == fp8.E5M2_MAX == fp8.FORMAT_MAX["e5m2"] == 1.75 * 2 ** 15
    assert finite[finite > 0].min() == 2 ** -16
    assert torch.equal(finite[(finite >= 1) & (finite < 2)].sort().values, 1 + torch.arange(4) / 4)
    top = finite[finite >= 32768].sort().values
    assert top.tolist() == [32768.0, 40960.0, 49152.0, 57344.0]  # spacing 8192 near the top
    # binades from the smallest subnormal to the top: e5m2 ~31.8, e4m3 ~17.8
    assert 31 < math.log2(57344 / 2 ** -16) < 32 and 17 < math.log2(448 / 2 ** -9) < 18


@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_e5m2_quantisers(scale_fmt):
    x = torch.randn(6, 300) * torch.logspace(-2, 2, 300)
    q, scale = quantize_act_1x128(x, scale_fmt, fmt="e5m2")
    assert q.dtype == E5M2 and q.shape == x.shape and scale.shape == (6, 3)
    amax = torch.nn.functional.pad(x, (0, 84)).view(6, 3, 128).abs().amax(-1)
    if scale_fmt == "fp32":
        torch.testing.assert_close(scale, amax / 57344, rtol=1e-6, atol=0)
    else:
        assert bool((scale >= amax / 57344).all() and (scale < 2 * amax / 57344).all())
    # half an ulp of 2 mantissa bits (normal range; subnormal spacing 2^-16 of the scale)
    full = scale.repeat_interleave(128, -1)[:, :300]
    y = (x / full).abs()
    bound = 0.5 * torch.exp2(torch.floor(torch.log2(y.clamp_min(2 ** -14))) - 2) * full * (1 + 1e-6)
    assert bool(((dequantize_act_1x128(q, scale) - x).abs() <= bound).all())
    wq, ws = quantize_weight_128x128(x, scale_fmt, fmt="e5m2")
    assert wq.dtype == E5M2 and ws.shape == (1, 3)
    pq, ps = quantize_per_tensor(x, scale_fmt, fmt="e5m2")
    assert pq.dtype == E5M2 and float(pq.float().abs().max()) <= 57344
    with pytest.raises(ValueError, match="fmt must be one of"):
        quantize_act_1x128(x, fmt="e3m4")


def test_e5m2_error_is_twice_e4m3():
    """One mantissa bit fewer: RMS rounding error twice as large (uniform in-binade model)."""
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))

    def rms_rel(fmt):
        q, s = quantize_act_1x128(x, fmt=fmt)
        return ((dequantize_act_1x128(q, s) - x).norm() / x.norm()).item()

    e4, e5 = rms_rel("e4m3"), rms_rel("e5m2")
    assert 0.015 < e4 < 0.035 and 1.7 < e5 / e4 < 2.3


def test_fp8_linear_e5m2_gradients_use_e5m2():
    """grad_fmt='e5m2': Dgrad = dequant(e5m2 tiles of dy) @ dequant(W) (an independent rebuild)."""
    torch.manual_seed(0)
    layer = Fp8Linear(200, 150, grad_fmt="e5m2")
    x = torch.randn(40, 200, requires_grad=True)
    grad = torch.randn(40, 150)
    layer(x).backward(grad)
    g_q, g_s = quantize_act_1x128(grad, fmt="e5m2")
    w_q, w_s = quantize_weight_128x128(layer.weight.detach())
    expected = dequantize_act_1x128(g_q, g_s) @ dequantize_weight_128x128(w_q, w_s)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)
    ref = grad @ layer.weight.detach()
    assert ((x.grad - ref).norm() / ref.norm()).item() < 0.1
    with pytest.raises(ValueError, match="grad_fmt"):
        Fp8Linear(8, 8, grad_fmt="fp16")
