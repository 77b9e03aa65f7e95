"""FP8 quantisation in Triton: 1x128 activation tiles and 128x128 weight-block dequantisation.

Motivation
----------
DeepSeek-V3 (arXiv 2412.19437, §3.3) runs its linear layers in FP8 e4m3 with fine-grained
scales: one float32 scale per **1x128 tile** of an activation (one token, 128 consecutive
channels) and one per **128x128 block** of a weight. ``minimoe.fp8`` is that recipe in plain
PyTorch (``quantize_act_1x128``, ``dequantize_weight_128x128``); it pads, reshapes, reduces
and divides in several passes over memory. Quantising is memory-bound (a compare and a
multiply per element), so one kernel that reads each tile once and writes its FP8 values and
its scale once is what a real inference engine does -- DeepSeek's ``inference/kernel.py`` has
exactly these two kernels, ``act_quant`` and ``weight_dequant``.

The formulas (as in ``minimoe.fp8``), for a tile or block t:

    amax   = max(max_{i in t} |x_i|, amax_floor)    the floor (1e-4 for activations, far
                                                    smaller for gradients) keeps an all-zero
                                                    tile's scale finite
    s      = amax / 448                            "fp32" scale format
    s      = 2^ceil(log2(amax / 448))              "ue8m0": a power of two (DeepSeek-V3.1)
    q_i    = e4m3(clamp(x_i / s, -448, 448))        x_i ~= q_i * s

What the reader should notice
-----------------------------
* One program owns one tile: the reduction (amax) never leaves it, so there are no atomics
  and no second pass. The activation kernel's grid is (rows, ceil(K/128)).
* Unlike DeepSeek's original ``act_quant`` (which asserts K % 128 == 0), the last tile of a
  row is *masked*: lanes past K load 0 (which cannot change amax) and store nothing, so any
  K works and the result equals the reference's zero padding.
* ue8m0 rounds the scale *up* to a power of two with integer operations on its float32 bit
  pattern (bump the exponent when the mantissa is non-zero): exact, unlike ``exp2(ceil(log2))``
  with a GPU's approximate ``log2``. A power-of-two scale makes dequantisation exact (only
  the exponent changes), which is why DeepSeek-V3.1 stores scales this way.
* Both divisions (amax / 448 and x / s) are IEEE round-to-nearest (``tl.math.div_rn``):
  Triton's plain ``/`` on float32 compiles to an approximate division on NVIDIA GPUs (up to
  2 ulp), which would let a GPU's scales differ from torch's and could round a ue8m0 scale
  the wrong way.
* The division x / s and the clamp happen in float32; then ``_round_to_e4m3_grid`` rounds
  to the nearest e4m3 value (ties to even) in float32, so the final cast is exact. That
  shows what the cast does, and it makes Triton's interpreter agree with torch: the
  interpreter's own float32 -> e4m3 cast loses the carry when rounding crosses a power of
  two (31.8 becomes 16 instead of 32) and truncates subnormals.
* The kernels do not raise on NaN/inf (the reference does): that would cost a host sync.
  Instead a NaN or inf in a tile makes that tile's scale NaN (checked in registers, on the
  tile already loaded), so the GEMM rows that read it come out NaN and a diverged training
  step still shows; the tile's FP8 values are then meaningless.

Running it without a GPU: set ``TRITON_INTERPRET=1`` before triton is first imported; the
kernels then run on CPU tensors through Triton's interpreter (slow, for tests and reading).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
AMAX_FLOOR = 1e-4  # DeepSeek's act_quant floor, as in minimoe.fp8
BLOCK = 128  # tile length / block side
SCALE_FORMATS = ("fp32", "ue8m0")
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _round_scale_up_to_power_of_two(scale):
    """2^ceil(log2(scale)) for positive normal float32 scale, by integer operations.

    scale = 2^(e - 127) * 1.m: if the mantissa bits m are all zero it is already a power of
    two; otherwise the next power of two up is 2^(e + 1 - 127) (exponent + 1, mantissa 0).
    """
    bits = scale.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    exponent = exponent + (mantissa != 0).to(tl.int32)
    return (exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_e4m3_grid(y):
    """Round float32 y (|y| <= 448) to the nearest e4m3 value, ties to even, still in float32.

    Normal range (|y| >= 2^-6): keep 3 of float32's 23 mantissa bits by integer rounding on
    the bit pattern; a carry out of the mantissa correctly bumps the exponent. Subnormal
    range (|y| < 2^-6, spacing 2^-9): adding 2^14 (whose float32 ulp is 2^-9) and
    subtracting it again rounds to a multiple of 2^-9, ties to even, in float32 hardware.
    The cast to e4m3 that follows is then exact. A GPU's cast (cvt.rn) would give the same
    numbers by itself; Triton's interpreter does not (it loses the carry when rounding
    crosses a power of two and truncates subnormals), so the rounding is spelled out here.
    """
    raw = y.to(tl.int32, bitcast=True)
    bits = raw + 0x7FFFF + ((raw >> 20) & 1)  # round half to even at mantissa bit 20
    normal = (bits & -0x100000).to(tl.float32, bitcast=True)  # clear the 20 dropped bits
    magnitude = tl.abs(y)
    subnormal = (magnitude + 16384.0) - 16384.0
    subnormal = tl.where(raw < 0, -subnormal, subnormal)  # the sign bit: -0.0 stays -0.0
    return tl.where(magnitude < 0.015625, subnormal, normal)


@triton.jit
def _act_quant_kernel(
    X_ptr,
    X_row_stride,
    Q_ptr,
    S_ptr,
    n_cols,
    n_tiles,
    fp8_max,
    amax_floor,
    UE8M0: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Quantise one 1xBLOCK_SIZE tile of one row to e4m3 and write its scale.

    X_ptr:        (n_rows, n_cols) input, float32 / float16 / bfloat16, unit column stride
    X_row_stride: elements between two rows of X
    Q_ptr:        (n_rows, n_cols) float8_e4m3fn output, contiguous
    S_ptr:        (n_rows, n_tiles) float32 output scales, contiguous
    n_cols:       the row length K (need not be a multiple of BLOCK_SIZE)
    n_tiles:      ceil(K / BLOCK_SIZE), the row stride of S
    fp8_max:      448.0, the largest e4m3fn value
    amax_floor:   the smallest amax a scale is computed from (1e-4 for activations)
    UE8M0:        constexpr; True rounds the scale up to a power of two
    BLOCK_SIZE:   constexpr, the tile length (128)
    """
    # 1. which row, which tile, which columns (the last tile of a row is masked)
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols

    # 2. load the tile, upcast to float32; masked lanes are 0 and cannot raise amax
    x = tl.load(X_ptr + row * X_row_stride + cols, mask=mask, other=0.0).to(tl.float32)  # read 128

    # 3. the tile's scale: amax / 448 with a floor, optionally a power of two
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), amax_floor)
    scale = tl.math.div_rn(amax, fp8_max)  # IEEE division: "/" is div.full.f32 (2 ulp) on GPUs
    if UE8M0:
        scale = _round_scale_up_to_power_of_two(scale)
    # a NaN or inf in the tile makes its scale NaN (max() skips a NaN, and an inf would give
    # an infinite scale and zeros), so every product that reads the tile is NaN: in registers,
    # no extra pass over memory
    n_non_finite = tl.sum(tl.where(tl.abs(x) <= 3.4028234663852886e38, 0, 1), axis=0)
    scale = tl.where(n_non_finite > 0, float("nan"), scale)

    # 4. divide, clamp to the format's range, round to e4m3 and store
    y = _round_to_e4m3_grid(tl.clamp(tl.math.div_rn(x, scale), -fp8_max, fp8_max))
    tl.store(Q_ptr + row * n_cols + cols, y.to(Q_ptr.dtype.element_ty), mask=mask)  # write 128 B
    tl.store(S_ptr + row * n_tiles + tile, scale)  # write 4 B


@triton.jit
def _weight_dequant_kernel(
    Q_ptr,
    S_ptr,
    W_ptr,
    n_rows,
    n_cols,
    n_col_blocks,
    BLOCK_SIZE: tl.constexpr,
):
    """Dequantise one BLOCK_SIZE x BLOCK_SIZE block: w = q * scale_inv[block].

    Q_ptr:        (n_rows, n_cols) float8_e4m3fn weight, contiguous
    S_ptr:        (ceil(n_rows/BLOCK_SIZE), n_col_blocks) float32 scale_inv, contiguous
    W_ptr:        (n_rows, n_cols) output, float32 / bfloat16 / float16, contiguous
    n_rows:       N, the weight's out_features
    n_cols:       K, the weight's in_features
    n_col_blocks: ceil(K / BLOCK_SIZE), the row stride of S
    BLOCK_SIZE:   constexpr, the block side (128)
    """
    # 1. which block; rows and columns of it, masked at the matrix's edges
    block_row = tl.program_id(0)
    block_col = tl.program_id(1)
    rows = (block_row * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)).to(tl.int64)
    cols = block_col * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None] * n_cols + cols[None, :]

    # 2. the block's one scale, and its FP8 values upcast to float32
    scale = tl.load(S_ptr + block_row * n_col_blocks + block_col)  # read 4 B
    q = tl.load(Q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)  # read 128*128 B

    # 3. multiply, cast to the output dtype, store
    tl.store(W_ptr + offsets, (q * scale).to(W_ptr.dtype.element_ty), mask=mask)  # write 128*128 el.


# True when this module was imported with TRITON_INTERPRET=1: @triton.jit then built
# interpreted Python functions instead of GPU kernels (minimoe.kernel_switch checks it).
INTERPRETED = not isinstance(_act_quant_kernel, triton.runtime.JITFunction)


def act_quant(x: torch.Tensor, scale_fmt: str = "fp32", amax_floor: float = AMAX_FLOOR):
    """Quantise x along its last dim in 1x128 tiles (DeepSeek's ``act_quant``), any K.

    x (..., K) float32 / bfloat16 / float16 on CUDA (or the CPU under TRITON_INTERPRET=1),
    unit stride along K. Returns q (..., K) float8_e4m3fn and scale (..., ceil(K/128))
    float32 with x[..., k] ~= q[..., k] * scale[..., k // 128]: the same numbers as
    ``minimoe.fp8.quantize_act_1x128``, bit for bit (the kernel rounds to the e4m3 grid
    itself, so the interpreter agrees too; ``tests/test_kernels_fp8.py``).
    amax_floor: the smallest amax a scale is computed from (1e-4 for activations, as in
    DeepSeek's kernel; the backward of minimoe.fp8 passes a far smaller one for gradients).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K)")
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}")
    if not 1e-35 <= amax_floor < float("inf"):
        raise ValueError(f"amax_floor must be a number >= 1e-35, got {amax_floor!r}")
    *lead, K = x.shape
    n_tiles = triton.cdiv(K, BLOCK)
    x2d = x.reshape(-1, K)  # (R, K) a view when x's rows are evenly spaced
    if K > 1 and x2d.stride(-1) != 1:
        raise ValueError(f"x must have unit stride along its last dim, got strides "
                         f"{tuple(x.stride())} (call .contiguous() first)")
    R = x2d.shape[0]
    q = torch.empty((R, K), dtype=FP8_DTYPE, device=x.device)  # (R, K)
    scale = torch.empty((R, n_tiles), dtype=torch.float32, device=x.device)  # (R, ceil(K/128))
    if R > 0 and K > 0:
        _act_quant_kernel[(R, n_tiles)](
            x2d, x2d.stride(0), q, scale, K, n_tiles, FP8_MAX, float(amax_floor),
            UE8M0=scale_fmt == "ue8m0", BLOCK_SIZE=BLOCK,
        )
    return q.view(*lead, K), scale.view(*lead, n_tiles)


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = q * scale_inv in block x block tiles (DeepSeek's ``weight_dequant``), any shape.

    q (N, K) float8_e4m3fn contiguous; scale_inv (ceil(N/block), ceil(K/block)) float32
    contiguous (a checkpoint's ``weight_scale_inv``). Returns w (N, K) in `dtype` (float32,
    bfloat16 or float16): ``minimoe.fp8.dequantize_weight_128x128`` for block=128.
    """
    if not isinstance(q, torch.Tensor) or q.dtype != FP8_DTYPE:
        raise ValueError(f"q must be a float8_e4m3fn tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if not isinstance(scale_inv, torch.Tensor) or scale_inv.dtype != torch.float32:
        raise ValueError(f"scale_inv must be a float32 tensor, got "
                         f"{getattr(scale_inv, 'dtype', type(scale_inv).__name__)}")
    if q.dim() != 2:
        raise ValueError(f"q must be a 2-D (out_features, in_features) matrix, got shape {tuple(q.shape)}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if dtype not in _OUTPUT_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    N, K = q.shape
    grid = (triton.cdiv(N, block), triton.cdiv(K, block))
    if tuple(scale_inv.shape) != grid:
        raise ValueError(f"scale_inv must have shape (ceil(N/{block}), ceil(K/{block})) = {grid} "
                         f"for q of shape {tuple(q.shape)}, got {tuple(scale_inv.shape)}")
    if not q.is_contiguous() or not scale_inv.is_contiguous():
        raise ValueError("q and scale_inv must be contiguous (call .contiguous() first)")
    if q.device != scale_inv.device:
        raise ValueError(f"q and scale_inv must be on one device, got {q.device} and {scale_inv.device}")
    w = torch.empty((N, K), dtype=dtype, device=q.device)  # (N, K)
    if N > 0 and K > 0:
        _weight_dequant_kernel[grid](q, scale_inv, w, N, K, grid[1], BLOCK_SIZE=block)
    return w
