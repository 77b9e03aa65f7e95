"""The Triton rotary embedding (minimoe.kernels.rope) against minimoe.rope.apply_rotary, on the CPU.

Runs through Triton's interpreter; TRITON_INTERPRET is set before triton is imported,
for the reason given in tests/test_kernels_rmsnorm.py.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from minimoe import kernel_switch  # noqa: E402
from minimoe.rope import RotaryEmbedding  # noqa: E402
from minimoe.rope import apply_rotary as reference_apply_rotary  # noqa: E402

if not kernel_switch.triton_interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file alone",
                allow_module_level=True)

from minimoe.kernels.rope import apply_rotary  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}  # ~1 ulp
# (B, T, H, D, rotary_dim): one pair; partial rotary with odd widths; full; MLA-like 64/32
SHAPES = [(1, 1, 1, 2, 2), (2, 7, 3, 24, 8), (1, 33, 2, 10, 6), (2, 13, 1, 20, 20), (3, 5, 2, 64, 32),
          (1, 3, 1, 200, 4)]


def rotate_both(x, cos, sin):
    """(y, dx) from the reference and from the kernel, for one random dy."""
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference_apply_rotary(x_ref, cos, sin)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    x_k = x.detach().clone().requires_grad_()
    y_k = apply_rotary(x_k, cos, sin)
    y_k.backward(dy)
    return (y_ref, x_ref.grad), (y_k, x_k.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(dtype, shape):
    B, T, H, D, rotary_dim = shape
    cos, sin = RotaryEmbedding(rotary_dim, 10000.0, 64)(torch.arange(5, 5 + T))  # (T, rotary_dim)
    # as attention hands it over: (B, T, H, D) projected, then transposed to a strided (B, H, T, D)
    x = torch.randn(B, T, H, D).to(dtype).transpose(1, 2)
    (y_ref, dx_ref), (y, dx) = rotate_both(x, cos, sin)
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == (B, H, T, D)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol)
    # the pass-through dims are copied bit for bit, forward and backward
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])


def test_backward_is_the_rotation_by_minus_theta():
    """With RotaryEmbedding's tables, dx = rotation of dy by -theta, i.e. sin -> -sin."""
    cos, sin = RotaryEmbedding(16, 10000.0, 64)(torch.arange(9))
    x = torch.randn(2, 3, 9, 24, requires_grad=True)
    dy = torch.randn(2, 3, 9, 24)
    apply_rotary(x, cos, sin).backward(dy)
    torch.testing.assert_close(x.grad, reference_apply_rotary(dy, cos, -sin))


def test_arbitrary_tables_exact_transpose():
    """Tables whose halves differ (not a rotation): the backward is still the exact transpose."""
    cos, sin = torch.randn(6, 8), torch.randn(6, 8)
    x = torch.randn(2, 2, 6, 12)
    (y_ref, dx_ref), (y, dx) = rotate_both(x, cos, sin)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)


def test_yarn_tables_and_other_ranks():
    """Scaled tables (YaRN's cos_sin_scale), and x of rank 3 and 5."""
    rope = RotaryEmbedding(8, 10000.0, 32, {"type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 8})
    cos, sin = rope(torch.arange(11))
    for x in (torch.randn(3, 11, 10), torch.randn(2, 2, 2, 11, 8)):
        (y_ref, dx_ref), (y, dx) = rotate_both(x, cos, sin)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(dx, dx_ref)


def test_shapes_are_checked():
    cos, sin = RotaryEmbedding(8, 10000.0, 16)(torch.arange(4))
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary(torch.randn(1, 1, 4, 6), cos, sin)
    with pytest.raises(ValueError, match="T = 5"):
        apply_rotary(torch.randn(1, 1, 5, 8), cos, sin)
