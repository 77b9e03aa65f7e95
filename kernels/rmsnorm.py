"""RMSNorm in Triton: forward and backward, one row per program, float32 math.

Motivation
----------
``minimoe.norm.RMSNorm`` written in PyTorch launches about six kernels per call (upcast,
square, mean, rsqrt, two multiplies, downcast) and each one reads and writes the whole
activation: roughly 12 passes over memory for what is one read of x and one write of y.
RMSNorm is memory-bound (a handful of FLOPs per element), so fusing everything into one
kernel that reads a row once, keeps it in registers, and writes the result once is close to
a 5-10x win on a GPU. The same holds for the backward pass.

The formula (Zhang & Sennrich 2019), with N = the row width:

    rstd   = 1 / sqrt(mean_j(x_j^2) + eps)                  one float32 number per row
    y_j    = x_j * rstd * w_j

    backward, with g_j = dy_j * w_j:
    dx_j   = rstd * g_j - rstd^3 * x_j * (sum_k g_k x_k) / N
    dw_j   = sum over rows of dy_j * x_j * rstd

What the reader should notice
-----------------------------
* One program owns one whole row (BLOCK_SIZE = the next power of two >= N, masked), so the
  reduction mean(x^2) never leaves the program: no atomics, no second pass.
* The forward saves ``rstd`` (one float per row) for the backward: recomputing it would
  cost a reduction, storing it costs 4 bytes per row.
* The weight gradient is a sum over *all* rows. Each backward program walks a contiguous
  slice of rows and accumulates its partial dw in float32 registers, writes it once to
  ``dW_partial[program]``, and the host sums the (programs, N) partials: no atomics, and
  the number of partial rows is the number of programs (on a GPU: the number of SMs), not
  the number of tokens. Liger-Kernel's rms_norm does the same.
* All arithmetic is float32 whatever the input dtype, as in the reference; only the loads
  and stores see float16/bfloat16.

Running it without a GPU: set ``TRITON_INTERPRET=1`` before triton is first imported (best:
before starting Python). ``@triton.jit`` reads it when it decorates a function, here and in
triton.language itself; the kernels then run on CPU tensors through Triton's interpreter
(slow, for tests and reading). See ``minimoe.kernel_switch``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_forward_kernel(
    Y_ptr,
    Y_row_stride,
    X_ptr,
    X_row_stride,
    W_ptr,
    RSTD_ptr,
    n_cols,
    eps,
    BLOCK_SIZE: tl.constexpr,
):
    """y = x * rstd * w for one row; stores rstd for the backward.

    Y_ptr:        (n_rows, n_cols) output, the input's dtype
    Y_row_stride: elements between two rows of Y
    X_ptr:        (n_rows, n_cols) input, float32 / float16 / bfloat16
    X_row_stride: elements between two rows of X
    W_ptr:        (n_cols,) gain, any float dtype
    RSTD_ptr:     (n_rows,) float32 output: 1 / sqrt(mean(x^2) + eps) of each row
    n_cols:       the row width N
    eps:          added to mean(x^2) inside the square root
    BLOCK_SIZE:   constexpr, next power of two >= n_cols (the row is masked to n_cols)
    """
    # 1. which row, which columns
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols

    # 2. load the row and the gain, upcast to float32
    x = tl.load(X_ptr + row * X_row_stride + cols, mask=mask, other=0.0).to(tl.float32)  # read N
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # read N (cached across rows)

    # BEGIN SOLUTION triton-rmsnorm
    # 3. the row statistic (masked lanes are 0 and do not count: divide by n_cols)
    mean_square = tl.sum(x * x, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(mean_square + eps)
    tl.store(RSTD_ptr + row, rstd)  # write 1

    # 4. normalise, apply the gain, cast back to the output dtype
    y = (x * rstd) * w
    tl.store(Y_ptr + row * Y_row_stride + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)  # write N
    # END SOLUTION


@triton.jit
def _rms_norm_backward_kernel(
    dY_ptr,
    dY_row_stride,
    dX_ptr,
    dX_row_stride,
    X_ptr,
    X_row_stride,
    W_ptr,
    RSTD_ptr,
    dW_partial_ptr,
    dW_partial_row_stride,
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK_SIZE: tl.constexpr,
):
    """dx for a contiguous slice of rows, and this program's partial sum of dw.

    dY_ptr:                (n_rows, n_cols) upstream gradient
    dY_row_stride:         elements between two rows of dY
    dX_ptr:                (n_rows, n_cols) output gradient of x, x's dtype
    dX_row_stride:         elements between two rows of dX
    X_ptr:                 (n_rows, n_cols) the forward input
    X_row_stride:          elements between two rows of X
    W_ptr:                 (n_cols,) gain
    RSTD_ptr:              (n_rows,) float32, saved by the forward
    dW_partial_ptr:        (programs, n_cols) float32 output: this program's sum of dy*x*rstd
    dW_partial_row_stride: elements between two rows of dW_partial
    n_rows:                number of rows
    n_cols:                the row width N
    rows_per_program:      rows handled by each program (the last one may get fewer)
    BLOCK_SIZE:            constexpr, next power of two >= n_cols
    """
    # 1. this program's rows and the columns
    program = tl.program_id(0)
    row_start = program * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols

    # 2. the gain once, a float32 accumulator for dw
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # read N
    dw = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)

    # pointers to the first row of the slice; each iteration moves them down one row
    first = row_start.to(tl.int64)
    dY_row = dY_ptr + first * dY_row_stride
    dX_row = dX_ptr + first * dX_row_stride
    X_row = X_ptr + first * X_row_stride
    for row in range(row_start, row_end):
        # 3. load one row of x and dy, and its rstd
        x = tl.load(X_row + cols, mask=mask, other=0.0).to(tl.float32)  # read N
        dy = tl.load(dY_row + cols, mask=mask, other=0.0).to(tl.float32)  # read N
        rstd = tl.load(RSTD_ptr + row)  # read 1

        # 4. dx = rstd * g - rstd^3 * x * mean(g * x), with g = dy * w
        g = dy * w
        mean_gx = tl.sum(g * x, axis=0) / n_cols
        dx = rstd * g - (rstd * rstd * rstd) * x * mean_gx
        tl.store(dX_row + cols, dx.to(dX_ptr.dtype.element_ty), mask=mask)  # write N

        # 5. accumulate this row's contribution to dw in registers
        dw += dy * (x * rstd)
        dY_row += dY_row_stride
        dX_row += dX_row_stride
        X_row += X_row_stride

    # 6. one write of the partial dw per program; the host sums the partials
    tl.store(dW_partial_ptr + program * dW_partial_row_stride + cols, dw, mask=mask)  # write N


# True when this module was imported with TRITON_INTERPRET=1: @triton.jit then built
# interpreted Python functions instead of GPU kernels (minimoe.kernel_switch checks it).
INTERPRETED = not isinstance(_rms_norm_forward_kernel, triton.runtime.JITFunction)


def _num_warps(block_size: int) -> int:
    """Warps per program: enough threads that a wide row does not spill registers (as Liger)."""
    if block_size >= 32768:
        return 32
    if block_size >= 8192:
        return 16
    if block_size >= 2048:
        return 8
    return 4


def _backward_programs(n_rows: int, device: torch.device) -> int:
    """How many backward programs: one per SM on a GPU, a few in the interpreter."""
    if device.type == "cuda":
        return min(n_rows, torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)


class RMSNormFunction(torch.autograd.Function):
    """autograd glue: forward and backward each launch one Triton kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        n_cols = shape[-1]
        x2d = x.reshape(-1, n_cols)  # (n_rows, N) a view when x is contiguous
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        n_rows = x2d.shape[0]
        block_size = triton.next_power_of_2(n_cols)
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)  # (n_rows, N)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)  # (n_rows,)
        if n_rows > 0:
            _rms_norm_forward_kernel[(n_rows,)](
                y, y.stride(0), x2d, x2d.stride(0), weight, rstd, n_cols, eps,
                BLOCK_SIZE=block_size, num_warps=_num_warps(block_size),
            )
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.block_size = block_size
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2d.shape
        dy2d = dy.reshape(-1, n_cols)
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        dx = torch.empty_like(x2d)  # (n_rows, N)
        programs = max(_backward_programs(n_rows, x2d.device), 1)
        rows_per_program = triton.cdiv(max(n_rows, 1), programs)
        dw_partial = torch.zeros((programs, n_cols), dtype=torch.float32, device=x2d.device)
        if n_rows > 0:
            _rms_norm_backward_kernel[(programs,)](
                dy2d, dy2d.stride(0), dx, dx.stride(0), x2d, x2d.stride(0), weight, rstd,
                dw_partial, dw_partial.stride(0), n_rows, n_cols, rows_per_program,
                BLOCK_SIZE=ctx.block_size, num_warps=_num_warps(ctx.block_size),
            )
        dw = dw_partial.sum(dim=0).to(weight.dtype)  # (N,)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Triton RMSNorm over the last dim of x: x * rsqrt(mean(x^2) + eps) * weight, in x.dtype.

    x: (..., N) on CUDA (or on the CPU under TRITON_INTERPRET=1); weight: (N,). Differentiable
    in x and weight; the same numbers as ``minimoe.norm.RMSNorm`` up to float rounding.
    """
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the last dim of x {x.shape[-1]}")
    return RMSNormFunction.apply(x, weight, eps)
