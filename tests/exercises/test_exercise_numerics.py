"""Exercise fp8-act-quant: FP8 1x128 activation quantisation, against a loop over tiles.

Reference (DeepSeek-V3 Section 3.3.2, its ``act_quant``): per row and per 128 columns,
s = max(amax, 1e-4) / 448 (ue8m0: rounded up to a power of two), q = cast_e4m3(x / s).
"""

import math

import pytest
import torch

from minimoe.fp8 import dequantize_act_1x128, quantize_act_1x128


def quantise_by_tiles(x, scale_fmt):
    rows = x.reshape(-1, x.shape[-1]).float()
    K = rows.shape[1]
    n_tiles = math.ceil(K / 128)
    q = torch.empty(rows.shape, dtype=torch.float8_e4m3fn)
    scales = torch.empty(rows.shape[0], n_tiles)
    for r in range(rows.shape[0]):
        for b in range(n_tiles):
            tile = rows[r, b * 128:(b + 1) * 128]
            scale = max(tile.abs().max().item(), 1e-4) / 448.0
            scale = torch.tensor(scale, dtype=torch.float32).item()  # a float32 scale
            if scale_fmt == "ue8m0":
                mantissa, exponent = math.frexp(scale)
                scale = scale if mantissa == 0.5 else 2.0 ** exponent
            scales[r, b] = scale
            q[r, b * 128:(b + 1) * 128] = (tile / scales[r, b]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(x.shape), scales.view(*x.shape[:-1], n_tiles)


@pytest.mark.exercise("fp8-act-quant", points=2)
@pytest.mark.parametrize("shape", [(3, 128), (4, 300), (2, 3, 257), (1, 5)])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_act_quant_matches_the_tile_loop(shape, scale_fmt):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=generator) * torch.logspace(-3, 3, shape[-1])  # wide range
    q, scale = quantize_act_1x128(x, scale_fmt=scale_fmt)
    want_q, want_scale = quantise_by_tiles(x, scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.shape == want_scale.shape
    torch.testing.assert_close(scale, want_scale, atol=0, rtol=0)
    assert torch.equal(q.float(), want_q.float())


@pytest.mark.exercise("fp8-act-quant", points=2)
def test_act_quant_error_is_within_e4m3_rounding():
    x = torch.randn(6, 384, generator=torch.Generator().manual_seed(8)) * 10
    q, scale = quantize_act_1x128(x)
    error = (dequantize_act_1x128(q, scale) - x).abs()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, plus the subnormal step
    bound = x.abs() * 2.0 ** -4 + scale.repeat_interleave(128, dim=-1) * 2.0 ** -10
    assert (error <= bound).all()
    assert q.float().abs().amax(dim=-1).min() >= 416  # each tile's largest value maps near 448
