"""Exercise triton-rmsnorm: the Triton RMSNorm forward kernel, run on the CPU by Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported (see tests/test_kernels_rmsnorm.py);
the reference is the formula y = x / sqrt(mean(x^2) + eps) * w written out here.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from minimoe import kernel_switch  # noqa: E402

if not kernel_switch.triton_interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file alone",
                allow_module_level=True)

from minimoe.kernels.rmsnorm import rms_norm  # noqa: E402


def rms_norm_formula(x, weight, eps):
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.exercise("triton-rmsnorm", points=2)
@pytest.mark.parametrize("shape", [(1, 7), (5, 130), (2, 3, 64)])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_kernel_forward_matches_the_formula(shape, dtype, tolerance):
    generator = torch.Generator().manual_seed(9)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    weight = torch.randn(shape[-1], generator=generator)
    y = rms_norm(x, weight, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), rms_norm_formula(x, weight, 1e-6), atol=tolerance * 10,
                               rtol=tolerance)


@pytest.mark.exercise("triton-rmsnorm", points=2)
def test_kernel_stores_rstd_for_the_backward():
    """The given backward kernel reads the rstd your forward stores: gradients reveal it."""
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(4, 33, generator=generator, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(33, generator=generator, requires_grad=True)
    dy = torch.randn(4, 33, generator=generator)
    rms_norm(x, weight, 1e-5).backward(dy)
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    rms_norm_formula(x64, w64, 1e-5).backward(dy.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=1e-4, rtol=1e-4)
