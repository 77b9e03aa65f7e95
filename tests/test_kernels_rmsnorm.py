"""The Triton RMSNorm (minimoe.kernels.rmsnorm) against minimoe.norm.RMSNorm, on the CPU.

The kernels run through Triton's interpreter. TRITON_INTERPRET must be set before triton
is first imported: @triton.jit reads it when it decorates a function, in our kernel
modules and in triton.language itself (tl.sum, ...), so the mode is fixed per process.
pytest imports every test module while collecting, before any test runs, and nothing
else imports triton, so setting it here, at the top, decides it for the whole worker; it
stays set (triton keeps reading it while interpreting), which only affects other code
that uses triton in the same worker.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see the docstring)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from minimoe import kernel_switch  # noqa: E402
from minimoe.norm import RMSNorm  # noqa: E402

if not kernel_switch.triton_interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file alone",
                allow_module_level=True)

from minimoe.kernels.rmsnorm import rms_norm  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows..., N): a single short row, odd sizes in every dim, a full power-of-two row
SHAPES = [(1, 7), (6, 42, 123), (3, 256), (2, 3, 5, 33)]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # ~1 ulp


def reference_and_kernel(x, weight, eps):
    """(y, dx, dw) from the reference module and from the kernel, for one random dy."""
    norm = RMSNorm(x.shape[-1], eps=eps).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = norm(x_ref)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)

    x_k = x.detach().clone().requires_grad_()
    w_k = weight.detach().clone().requires_grad_()
    y_k = rms_norm(x_k, w_k, eps)
    y_k.backward(dy)
    return (y_ref, x_ref.grad, norm.weight.grad), (y_k, x_k.grad, w_k.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_reference(dtype, shape):
    x = torch.randn(shape, dtype=torch.float32).mul(3).to(dtype)
    weight = torch.randn(shape[-1])  # a float32 gain, as in the model
    (y_ref, dx_ref, dw_ref), (y, dx, dw) = reference_and_kernel(x, weight, eps=1e-6)
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    assert dx.dtype == dtype
    torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol)
    assert dw.dtype == torch.float32
    # dw sums over all rows in float32, in another order: relative to its size
    torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-4 * dw_ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_weight_in_the_activation_dtype(dtype):
    """A model cast to half precision: the gain is half too, and so is its gradient."""
    x = torch.randn(5, 40).to(dtype)
    weight = torch.randn(40).to(dtype)
    (y_ref, dx_ref, dw_ref), (y, dx, dw) = reference_and_kernel(x, weight, eps=1e-5)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol)
    assert dw.dtype == dtype
    torch.testing.assert_close(dw.float(), dw_ref.float(), rtol=2 * tol, atol=2 * tol)


def test_strided_inputs_and_more_rows_than_backward_programs():
    """Rows with a gap between them (a slice), and a transposed tensor (copied first)."""
    base = torch.randn(11, 64)
    weight = torch.randn(48)
    for x in (base[:, :48], torch.randn(48, 11).t()):
        (y_ref, dx_ref, dw_ref), (y, dx, dw) = reference_and_kernel(x, weight, eps=1e-6)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(dx, dx_ref)
        torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)


def test_zero_row_and_eps():
    """An all-zero row normalises to zero with a finite gradient (eps is inside the sqrt)."""
    x = torch.zeros(2, 9)
    x[1] = torch.randn(9)
    (y_ref, dx_ref, _), (y, dx, _) = reference_and_kernel(x, torch.ones(9), eps=1e-2)
    assert torch.isfinite(dx).all()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)


def test_weight_shape_is_checked():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.randn(2, 8), torch.ones(7))
