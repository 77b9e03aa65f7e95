"""Rotary position embeddings in Triton: the rotate-half rotation, partial rotary, backward.

Motivation
----------
``minimoe.rope.apply_rotary`` in PyTorch slices x, upcasts, builds ``rotate_half(x)``
(a chunk, a negation and a concatenation), multiplies twice, adds, downcasts and
concatenates the pass-through dims back: about eight kernels and as many round trips
through memory for an operation that needs one read of x and one write of the result.
It is applied to every query and key of every layer, so the fused kernel here is a
straight memory-bandwidth win on a GPU.

The formula, per head vector x of width D at position t, with d = rotary_dim, h = d / 2,
x1 = x[:h], x2 = x[h:d] (pair i = (x[i], x[i + h]), the rotate-half layout) and cos, sin
the (T, d) tables of ``minimoe.rope.RotaryEmbedding`` (each = [c, c] for the pair angles):

    y[:h]  = x1 * cos[t, :h] - x2 * sin[t, :h]
    y[h:d] = x2 * cos[t, h:] + x1 * sin[t, h:]
    y[d:]  = x[d:]                                   partial rotary: the rest passes through

Backward: the rotation is linear in x, so dx = R^T dy. A rotation's transpose is the
rotation by -theta (cos stays, sin changes sign):

    dx[:h]  = dy1 * cos[t, :h] + dy2 * sin[t, h:]
    dx[h:d] = dy2 * cos[t, h:] - dy1 * sin[t, :h]
    dx[d:]  = dy[d:]

(written with both halves of the tables, so the transpose is exact even for tables whose
halves differ; for RotaryEmbedding's tables it is exactly the rotation by -theta). The
same kernel does both directions: a constexpr ``BACKWARD`` flips the sign of sin.

What the reader should notice
-----------------------------
* One program per (batch * head, position) row: it loads h numbers of cos and h of sin
  for its position (the tables are shared by every head and batch, so they stay in cache),
  h + h numbers of x, and copies the D - d pass-through numbers in the same pass.
* x may be a strided view (attention hands over ``q.transpose(1, 2)``): the kernel takes
  the strides of batch, head and position, so no copy is made; the output is contiguous.
* cos and sin are float32 and the rotation is float32; only the store casts to x.dtype.

Running it without a GPU: set ``TRITON_INTERPRET=1`` before triton is first imported (see
kernels/rmsnorm.py and ``minimoe.kernel_switch``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    Y_ptr,
    X_ptr,
    X_batch_stride,
    X_head_stride,
    X_pos_stride,
    COS_ptr,
    SIN_ptr,
    COS_row_stride,
    num_heads,
    seq_len,
    head_dim,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Rotate (or, with BACKWARD, un-rotate) the first 2*HALF dims of one head vector.

    Y_ptr:          (B, H, T, D) contiguous output, x's dtype
    X_ptr:          (B, H, T, D) input, last dim contiguous, other dims strided
    X_batch_stride: elements between two batches of X
    X_head_stride:  elements between two heads of X
    X_pos_stride:   elements between two positions of X
    COS_ptr:        (T, rotary_dim) float32 cosine table
    SIN_ptr:        (T, rotary_dim) float32 sine table
    COS_row_stride: elements between two positions of COS and SIN (the same layout)
    num_heads:      H
    seq_len:        T
    head_dim:       D (>= rotary_dim)
    HALF:           constexpr, rotary_dim / 2
    BLOCK_HALF:     constexpr, next power of two >= HALF
    BLOCK_PASS:     constexpr, block width for copying the D - rotary_dim pass-through dims
    BACKWARD:       constexpr, True for the transpose (rotation by -theta)
    """
    # 1. which head vector: program 0 counts (batch, head), program 1 the position
    batch_head = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    x_row = X_ptr + batch * X_batch_stride + head * X_head_stride + pos * X_pos_stride
    y_row = Y_ptr + (batch_head * seq_len + pos) * head_dim
    half = tl.arange(0, BLOCK_HALF)
    mask = half < HALF

    # 2. the tables for this position, both halves, float32
    cos1 = tl.load(COS_ptr + pos * COS_row_stride + half, mask=mask, other=0.0)  # read h
    cos2 = tl.load(COS_ptr + pos * COS_row_stride + HALF + half, mask=mask, other=0.0)  # read h
    sin1 = tl.load(SIN_ptr + pos * COS_row_stride + half, mask=mask, other=0.0)  # read h
    sin2 = tl.load(SIN_ptr + pos * COS_row_stride + HALF + half, mask=mask, other=0.0)  # read h

    # 3. the two halves of the rotary part, upcast
    x1 = tl.load(x_row + half, mask=mask, other=0.0).to(tl.float32)  # read h
    x2 = tl.load(x_row + HALF + half, mask=mask, other=0.0).to(tl.float32)  # read h

    # 4. rotate: forward by +theta, backward by the transpose (-theta)
    if BACKWARD:
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(y_row + half, y1.to(Y_ptr.dtype.element_ty), mask=mask)  # write h
    tl.store(y_row + HALF + half, y2.to(Y_ptr.dtype.element_ty), mask=mask)  # write h

    # 5. partial rotary: copy dims rotary_dim .. D unchanged, BLOCK_PASS at a time
    for start in range(2 * HALF, head_dim, BLOCK_PASS):
        cols = start + tl.arange(0, BLOCK_PASS)
        keep = cols < head_dim
        passed = tl.load(x_row + cols, mask=keep, other=0.0)  # read D - d
        tl.store(y_row + cols, passed, mask=keep)  # write D - d


# True when this module was imported with TRITON_INTERPRET=1: @triton.jit then built
# interpreted Python functions instead of GPU kernels (minimoe.kernel_switch checks it).
INTERPRETED = not isinstance(_rotary_kernel, triton.runtime.JITFunction)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Run the kernel on x (..., H, T, D) with cos/sin (T, rotary_dim); returns a new tensor."""
    shape = x.shape
    x4 = x if x.dim() == 4 else x.reshape(-1, *shape[-3:]) if x.dim() > 4 else x.reshape(
        *([1] * (4 - x.dim())), *shape)  # (B, H, T, D)
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    B, H, T, D = x4.shape
    rotary_dim = cos.shape[-1]
    cos = cos.float().contiguous()  # (T, rotary_dim)
    sin = sin.float().contiguous()  # (T, rotary_dim)
    y = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)  # (B, H, T, D)
    if y.numel() > 0:
        half = rotary_dim // 2
        _rotary_kernel[(B * H, T)](
            y, x4, x4.stride(0), x4.stride(1), x4.stride(2), cos, sin, cos.stride(0), H, T, D,
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_PASS=min(triton.next_power_of_2(max(D - rotary_dim, 1)), 128),
            BACKWARD=backward,
        )
    return y.view(shape)


class RotaryFunction(torch.autograd.Function):
    """autograd glue: forward rotates by +theta, backward by -theta, each one kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, backward=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton version of ``minimoe.rope.apply_rotary`` (rotate-half layout, partial rotary).

    x: (B, H, T, D) with D >= rotary_dim, any strides with a contiguous last dim (otherwise
    copied); cos, sin: (T, rotary_dim). Returns a contiguous (B, H, T, D) tensor in x.dtype,
    differentiable in x (the tables are constants).
    """
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != x.shape[-2]:
        raise ValueError(f"cos and sin must be (T, rotary_dim) with T = {x.shape[-2]}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 != 0 or rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and <= the head width {x.shape[-1]}")
    return RotaryFunction.apply(x, cos, sin)
