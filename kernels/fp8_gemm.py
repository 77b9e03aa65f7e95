"""Block-scaled FP8 GEMM in Triton: y = dequant(a) @ dequant(w)^T with promotion every 128.

Motivation
----------
``minimoe.fp8.fp8_matmul_reference`` *simulates* DeepSeek-V3's FP8 GEMM: it dequantises both
operands to float32 tensors (4 bytes per element instead of 1, written and read again) and
multiplies those. A real FP8 GEMM keeps the operands in 8 bits all the way into the tensor
cores and applies the scales to the *partial sums* instead. This kernel is that GEMM
(DeepSeek's ``inference/kernel.py`` ``fp8_gemm``, with masked edges so that M, N and K need
not be multiples of the block sizes).

The formula (DeepSeek-V3, arXiv 2412.19437, §3.3 and Figure 7), for a (M, K) activation in
1x128 tiles and a (N, K) weight in 128x128 blocks, kb = the K block of 128:

    y[m, n] = sum_kb  a_scale[m, kb] * w_scale_inv[n // 128, kb] * (sum_{k in kb} qa[m, k] qw[n, k])
                      \\__________ one float32 multiply-add ________/   \\__ one tl.dot on FP8 __/

What the reader should notice
-----------------------------
* The scales are constant within a K block of 128, so they factor out of that block's inner
  sum: the tensor cores multiply raw e4m3 values, and the scales are applied once per block
  per output element, not once per product.
* **Promotion every 128.** Each block's ``tl.dot`` result is added into a separate float32
  accumulator after scaling. On H800s the tensor cores' own FP8 accumulation keeps only about
  14 bits; bounding each limited-precision run to 128 products and then promoting it to
  float32 (CUDA cores in DeepSeek's kernels; here the add below) is what keeps a long-K
  FP8 GEMM accurate. BLOCK_K is therefore *fixed* to the scale block, 128.
* The weight scale is loaded per output column (``offs_n // 128``), so BLOCK_N need not
  divide 128; the activation scale per output row. The same kernel serves the backward's
  weight gradient dW = dy^T @ x, whose second operand x^T is tiled 1x128 along the tokens
  (one scale per row, ``offs_n // 1``): ``fp8_gemm`` tells the two layouts of the second
  operand's scale apart by its shape, as ``minimoe.fp8.fp8_matmul_reference`` does.
* Masked loads put 0 in the lanes past M, N or K: a zero contributes nothing to any sum, so
  partial tiles are exact.
* An FP8 ``tl.dot`` needs a GPU with FP8 tensor cores (compute capability 8.9 or 9.0+: Ada,
  Hopper). Triton's interpreter upcasts the FP8 operands to float16 (exact) and multiplies
  in float32, so the products are the reference's; only the float32 summation order differs.

Running it without a GPU: set ``TRITON_INTERPRET=1`` before triton is first imported.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
BLOCK = 128  # the scale block along K (and the weight's block along N)


@triton.jit
def _fp8_gemm_kernel(
    A_ptr,
    A_scale_ptr,
    W_ptr,
    W_scale_ptr,
    Y_ptr,
    M,
    N,
    K,
    n_k_blocks,
    W_SCALE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y = (qa * a_scale) @ (qw * w_scale_inv)^T.

    A_ptr:       (M, K) float8_e4m3fn activations, contiguous
    A_scale_ptr: (M, n_k_blocks) float32, one scale per 1x128 tile of A, contiguous
    W_ptr:       (N, K) float8_e4m3fn weight (out_features, in_features), contiguous
    W_scale_ptr: (ceil(N/W_SCALE_ROWS), n_k_blocks) float32 scales of W, contiguous
    Y_ptr:       (M, N) float32 output, contiguous
    M, N, K:     the problem size (any; edges are masked)
    n_k_blocks:  ceil(K / 128), the row stride of both scale tensors
    W_SCALE_ROWS: constexpr, rows of W that share one scale per K block: 128 for 128x128
                 weight blocks (Fprop, Dgrad), 1 for 1x128 tiles (Wgrad, where the "weight"
                 operand is x^T tiled along the tokens)
    BLOCK_M:     constexpr, rows of A per program (>= 16, tl.dot's minimum)
    BLOCK_N:     constexpr, rows of W (columns of y) per program
    BLOCK_K:     constexpr, must equal the scale block (128): one promotion per K block
    """
    # 1. which output tile; its rows, its columns, and the K offsets of one block
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # pointers to the first K block: A as (BLOCK_M, BLOCK_K), W read transposed as
    # (BLOCK_K, BLOCK_N) -- W's rows are contiguous along K, which is what tl.dot wants
    a_ptrs = A_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    w_ptrs = W_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    a_scale_ptrs = A_scale_ptr + offs_m * n_k_blocks
    w_scale_ptrs = W_scale_ptr + (offs_n // W_SCALE_ROWS) * n_k_blocks

    # 2. the float32 accumulator that every K block is promoted into
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, n_k_blocks):
        # 3. load one K block of both operands in FP8; lanes past M, N or K are 0
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)  # read BM*128 B
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)  # read 128*BN B
        a_scale = tl.load(a_scale_ptrs + kb, mask=mask_m, other=0.0)  # read 4*BM B
        w_scale = tl.load(w_scale_ptrs + kb, mask=mask_n, other=0.0)  # read 4*BN B (few distinct)

        # 4. the block's inner sum on FP8 operands (tensor cores), then promotion: scale it
        #    and add it to the float32 accumulator
        partial = tl.dot(a, w, out_dtype=tl.float32)  # (BLOCK_M, BLOCK_N)
        acc += partial * a_scale[:, None] * w_scale[None, :]

        # 5. next K block
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # 6. write the tile
    y_ptrs = Y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])  # write 4*BM*BN B


# True when this module was imported with TRITON_INTERPRET=1: @triton.jit then built
# interpreted Python functions instead of GPU kernels (minimoe.kernel_switch checks it).
INTERPRETED = not isinstance(_fp8_gemm_kernel, triton.runtime.JITFunction)


def _check(t, name: str, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        raise ValueError(f"{name} must be a {dtype} tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor,
             w_scale_inv: torch.Tensor) -> torch.Tensor:
    """y = dequant(a) @ dequant(w)^T in float32, each K block of 128 promoted separately.

    a_q (..., K) float8_e4m3fn with a_scale (..., ceil(K/128)) float32 (1x128 tiles, as from
    ``act_quant``); w_q (N, K) float8_e4m3fn with w_scale_inv (ceil(N/128), ceil(K/128))
    float32 (128x128 blocks, a checkpoint's ``weight_scale_inv``) or (N, ceil(K/128)) (1x128
    tiles of each row, as for Wgrad's second operand x^T). All contiguous, on one
    CUDA device with FP8 tensor cores (or the CPU under TRITON_INTERPRET=1). Returns
    (..., N) float32: ``minimoe.fp8.fp8_matmul_reference`` up to float32 summation order
    (in the interpreter; on a GPU also up to the tensor cores' limited-precision accumulation
    inside each 128-long K block, which the promotion bounds).
    """
    _check(a_q, "a_q", FP8_DTYPE)
    _check(a_scale, "a_scale", torch.float32)
    _check(w_q, "w_q", FP8_DTYPE)
    _check(w_scale_inv, "w_scale_inv", torch.float32)
    if a_q.dim() < 1 or w_q.dim() != 2:
        raise ValueError(f"a_q must be (..., K) and w_q (N, K), got shapes {tuple(a_q.shape)} "
                         f"and {tuple(w_q.shape)}")
    *lead, K = a_q.shape
    N = w_q.shape[0]
    if w_q.shape[1] != K:
        raise ValueError(f"a_q (..., K) and w_q (N, K) must share K, got shapes {tuple(a_q.shape)} "
                         f"and {tuple(w_q.shape)}")
    n_k_blocks = triton.cdiv(K, BLOCK)
    if tuple(a_scale.shape) != (*lead, n_k_blocks):
        raise ValueError(f"a_scale must have shape {(*lead, n_k_blocks)} (1x128 tiles of a_q), "
                         f"got {tuple(a_scale.shape)}")
    if tuple(w_scale_inv.shape) == (triton.cdiv(N, BLOCK), n_k_blocks):
        w_scale_rows = BLOCK  # 128x128 blocks (for N == 1 both readings are the same)
    elif tuple(w_scale_inv.shape) == (N, n_k_blocks):
        w_scale_rows = 1  # 1x128 tiles, one scale per row of w_q
    else:
        raise ValueError(f"w_scale_inv must have shape {(triton.cdiv(N, BLOCK), n_k_blocks)} "
                         f"(128x128 blocks of w_q) or {(N, n_k_blocks)} (1x128 tiles), got "
                         f"{tuple(w_scale_inv.shape)}")
    devices = {t.device for t in (a_q, a_scale, w_q, w_scale_inv)}
    if len(devices) != 1:
        raise ValueError(f"all four tensors must be on one device, got {sorted(map(str, devices))}")
    M = math.prod(lead)  # all leading dims flattened into rows
    y = torch.zeros((M, N), dtype=torch.float32, device=a_q.device)  # (M, N)
    if M > 0 and N > 0 and K > 0:
        block_m = min(64, max(16, triton.next_power_of_2(M)))  # tl.dot needs >= 16
        block_n = 128
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        _fp8_gemm_kernel[grid](
            a_q, a_scale, w_q, w_scale_inv, y, M, N, K, n_k_blocks,
            W_SCALE_ROWS=w_scale_rows, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK,
        )
    return y.view(*lead, N)
