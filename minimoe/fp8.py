"""FP8: fine-grained quantisation and high-precision accumulation (DeepSeek-V3 §3.3).

DeepSeek-V3 was trained with most of its matrix multiplies in 8-bit floating point. This
module is the recipe in plain PyTorch, readable rather than fast: it quantises tensors the
way the paper does, *simulates* an FP8 GEMM by multiplying dequantised values in float32
(a CPU cannot multiply FP8 numbers, and the point here is the numbers, not the speed), and
wraps both in ``Fp8Linear``, a drop-in linear layer whose forward and backward use them.
Sources: DeepSeek-V3 technical report (arXiv 2412.19437) §3.3 and Figure 7; the official
``inference/kernel.py`` (``act_quant``, ``weight_dequant``, ``fp8_gemm``); the released
checkpoints' ``quantization_config`` (``weight_block_size [128, 128]``, ``weight_scale_inv``);
DeepSeek-V3.1's ``scale_fmt: "ue8m0"``.

The two formats
---------------
An FP8 number is 1 sign bit plus an exponent and a mantissa sharing the other 7 bits:

    format    bits (s/e/m)  bias  max normal  smallest normal  smallest subnormal  eps (ulp of 1)
    e4m3fn    1 / 4 / 3      7      448         2^-6             2^-9                2^-3 = 0.125
    e5m2      1 / 5 / 2     15    57344         2^-14            2^-16               2^-2 = 0.25

*e4m3fn* ("fn" = finite, NaN-only) gives up infinities: the all-ones exponent is an ordinary
binade, and only the pattern S.1111.111 is NaN. Its largest value is therefore
1.110_2 x 2^(15-7) = 1.75 x 256 = 448. *e5m2* follows IEEE rules (it has inf and several
NaNs), so its largest finite value is 1.11_2 x 2^(30-15) = 1.75 x 32768 = 57344. Between two
powers of two there are 8 e4m3 values (3 mantissa bits) and 4 e5m2 values, so rounding to
nearest costs a relative error of at most 2^-4 = 6.25% in e4m3 and 2^-3 in e5m2 (half an
ulp; for normal numbers). Older FP8 recipes used e4m3 forward and e5m2 for gradients (more
range, less precision); DeepSeek-V3 uses e4m3 *everywhere*, because fine-grained scaling
(below) gives every small group of numbers its own exponent offset, so the format's range
no longer has to cover the whole tensor.

What torch does at the edges (torch 2.13, checked by the tests): casting a float32 above 448
to ``float8_e4m3fn`` *saturates* to 448 -- and so does +inf -- while NaN stays NaN. A silently
saturated inf would hide a diverged training step, so every quantiser here refuses
non-finite input with a ``ValueError`` instead.

Scaling: per tensor, or per tile
--------------------------------
A tensor is stored as FP8 values q plus a float32 *scale* s with x ~= q * s. The scale maps
the largest magnitude in a group onto the top of the format: s = amax / 448. With one scale
per tensor (``quantize_per_tensor``), the largest element decides for everyone. e4m3 spans
about 18 binades (2^-9 .. 448), so a moderate outlier costs nothing: ordinary values just
sit lower in the format with the same 3-bit relative precision. But an outlier A sends
every value below A / 28672 (= s * 2^-6) into the subnormal range, where the spacing is a
fixed s * 2^-9 = A / 229376, and every value below half of that spacing to zero. An
outlier of 1e4 next to unit-scale activations already puts a quarter of them below
A / 28672 ~= 0.35. Activations of LLMs do have outlier channels, and gradients span even
more binades. DeepSeek-V3's answer is to scale small groups separately:

* activations: one scale per **1x128 tile** -- per token, per 128 consecutive channels along
  the reduction dimension K (``quantize_act_1x128``; scale shape ``(..., ceil(K/128))``);
* weights: one scale per **128x128 block** (``quantize_weight_128x128``; scale shape
  ``(ceil(out/128), ceil(in/128))``).

An outlier now only coarsens the 127 neighbours of its tile. Because the scale is constant
along a 128-long slice of K, a GEMM can multiply raw FP8 tiles on the tensor cores and apply
the product of the two scales once per 128-chunk of K -- which is exactly where the
promotion step below happens anyway. Square weight blocks have a second virtue: the blocks
of W^T are the blocks of W, so the backward pass (which multiplies by W^T) reuses the same
quantised weight.

Conventions used here, as in DeepSeek's code and checkpoints: the returned scale is the
*dequantisation* multiplier (x ~= q * s); for weights the checkpoint calls it
``weight_scale_inv`` because it is the inverse of the factor used to quantise.

* Scale format. ``scale_fmt="fp32"``: s = amax / 448 exactly. ``scale_fmt="ue8m0"``
  (DeepSeek-V3.1): s is rounded *up* to a power of two, s = 2^ceil(log2(amax / 448)), so it
  fits in an 8-bit exponent-only number (unsigned, 8 exponent bits, 0 mantissa bits) and
  scaling is an exact exponent shift. Rounding up keeps |x / s| <= 448; the price is up to
  one binade of unused range (values use 224..448 of the format at worst).
* The amax floor. s = max(amax, 1e-4) / 448: an all-zero tile (padding, a dead channel)
  would otherwise get s = 0 and 0/0 = NaN. With the floor it gets a tiny scale and its
  values quantise to exact zeros.
* Edge tiles. When K (or a weight dimension) is not a multiple of 128, conceptually pad
  with zeros up to the next multiple: the last tile is shorter, its amax is taken over the
  real elements only (zeros never raise an amax), and the scale tensors have ceil(n/128)
  entries along that dimension. The returned q has the input's shape, not the padded one.
* Inputs. float32, bfloat16, float16 and float64 are accepted (the arithmetic is done in
  float32); integer, bool, complex and already-FP8 tensors raise ``ValueError``, as do
  NaN / inf. Non-contiguous inputs (a transpose, a slice) are fine: q comes back contiguous.

Accumulation: why promote every 128 elements
--------------------------------------------
An FP8 GEMM on H800 tensor cores does not accumulate in full float32: the report measures
that the accumulator keeps only about 14 bits, and for K = 4096 "the maximum relative
error is nearly 2%". The fix (Figure 7b): let the tensor cores accumulate one interval of
N_C = 128 products (four WGMMA instructions), then copy the partial sum to float32
registers on the CUDA cores, multiply it by the two tiles' scales, and add it to a true
float32 accumulator. The rounding error of the limited accumulator then never grows over
more than 128 terms.

``fp8_matmul_reference`` simulates this. What exactly is simulated, with
``accumulator_bits = b``: within one promotion interval the running partial sum is rounded
to b mantissa bits (b + 1 significant bits; the float32 value's low 23 - b mantissa bits are
cut) after *every* addition of one product a_mk * w_nk; at the end of the interval the
partial sum is added to a float32 accumulator. ``promote_every=None`` means no promotion:
one interval spanning all of K. The products themselves are exact float32 products of the
dequantised operands (a product of two e4m3 values has at most 8 significant bits, so
float32 holds it exactly; the scale factors are applied per element instead of per interval,
which changes nothing but float32 rounding). ``accumulator_rounding`` chooses how the bits
are cut: "truncate" (toward zero, the default: a fixed-width hardware adder that aligns the
smaller addend to the larger exponent simply drops the shifted-out bits) or "nearest".
Real tensor cores are more intricate (they add several products at a time with a shared
alignment), so this is a model of the effect, not a bit-exact emulation of a GPU.
``python -m minimoe.experiments.fp8_accumulation`` measures the error against K: with a
14-bit truncating accumulator and no promotion, about 5% max relative error at K = 4096
(the paper reports nearly 2%; round-to-nearest gives 0.1%), and about 0.2% at every K with
promotion every 128.

With ``accumulator_bits=None`` the accumulation is float32 throughout; the function then
computes one float32 matmul of the dequantised operands (the same sum, in a different
order, as promoting every 128 products).

``Fp8Linear``: the three GEMMs of a linear layer
------------------------------------------------
For y = x W^T with x (M, K) and W (N, K), training runs three matrix multiplies, and
DeepSeek-V3 runs all three in FP8 with e4m3 operands and float32 accumulation:

    Fprop   y  = x  @ W^T     reduce over K: x in 1x128 tiles along K, W in 128x128 blocks
    Dgrad   dx = dy @ W       reduce over N: dy in 1x128 tiles along N, W^T = same blocks
    Wgrad   dW = dy^T @ x     reduce over M (tokens): dy^T and x^T in 1x128 tiles along M,
                              i.e. 128x1 tiles of dy and x

Each GEMM needs its operands tiled along *its* reduction dimension, so the x quantised for
Fprop (tiles along K) cannot serve Wgrad (tiles along M): the backward re-quantises. Here
the layer keeps a high-precision master weight (float32), quantises it afresh in every
forward, and the custom ``autograd.Function`` saves x and W in high precision.

What the reader should notice
-----------------------------
* The quantisation error of one e4m3 number is up to 6.25% (RMS about 2.5%), and a
  1x128-scaled GEMM of random operands is off by about 3.5% in relative Frobenius norm,
  *whatever K is*: independent rounding errors do average out over K (relative to the sum
  of |a_k w_k|, the error shrinks like 1/sqrt(K)), but so does a random-sign signal. What
  fine-grained scaling buys is that this stays true in the presence of outliers.
* Per-tensor scaling fails on activations with outliers; 1x128 tiles do not
  (``tests/test_fp8.py`` and the experiment's second figure measure by how much).
* Accumulation precision, not the 8-bit inputs, is what breaks a long-K FP8 GEMM; promoting
  every 128 products to float32 repairs it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
E5M2_MAX = torch.finfo(torch.float8_e5m2).max  # 57344.0
BLOCK = 128  # tile length (activations) and block side (weights)
AMAX_FLOOR = 1e-4  # smallest amax a scale is computed from (DeepSeek's act_quant)
SCALE_FORMATS = ("fp32", "ue8m0")
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------- checks
def _check_input(x: torch.Tensor, name: str, min_dim: int = 1) -> None:
    """Raise ValueError unless x is a finite floating tensor of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64 "
                         f"(high precision, to be quantised), got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape "
                         f"{tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; FP8 e4m3fn has no inf and torch "
                         f"would saturate inf to 448 silently, so refuse instead")


def _check_scale_fmt(scale_fmt: str) -> None:
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}")


def _check_quantised(q: torch.Tensor, scale: torch.Tensor, name: str) -> None:
    if not isinstance(q, torch.Tensor) or q.dtype != FP8_DTYPE:
        raise ValueError(f"{name} must be a float8_e4m3fn tensor, got "
                         f"{getattr(q, 'dtype', type(q).__name__)}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise ValueError(f"{name}'s scale must be a float32 tensor, got "
                         f"{getattr(scale, 'dtype', type(scale).__name__)}")


def _n_blocks(n: int) -> int:
    return -(-n // BLOCK)  # ceil(n / 128)


# ----------------------------------------------------------------------------- scales
def _scale_from_amax(amax: torch.Tensor, scale_fmt: str) -> torch.Tensor:
    """s = max(amax, 1e-4) / 448, or that rounded up to a power of two (ue8m0)."""
    scale = amax.float().clamp_min(AMAX_FLOOR) / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _to_fp8(x_scaled: torch.Tensor) -> torch.Tensor:
    # x / s can exceed 448 by a float32 rounding; clamp explicitly instead of relying on
    # torch's saturating cast (an implementation detail other backends do not share).
    return x_scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# ----------------------------------------------------------------------------- per tensor
def quantize_per_tensor(x: torch.Tensor, scale_fmt: str = "fp32"):
    """One scale for the whole tensor. Returns (q float8_e4m3fn like x, scale () float32)."""
    _check_input(x, "x", min_dim=0)
    _check_scale_fmt(scale_fmt)
    x = x.float()
    amax = x.abs().max() if x.numel() else torch.zeros(())
    scale = _scale_from_amax(amax, scale_fmt)  # ()
    return _to_fp8(x / scale), scale


def dequantize_per_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check_quantised(q, scale, "q")
    return q.float() * scale


# ----------------------------------------------------------------------------- 1x128 tiles
def quantize_act_1x128(x: torch.Tensor, scale_fmt: str = "fp32"):
    """Quantise along the last dimension in tiles of 128 (DeepSeek's ``act_quant``).

    x (..., K) -> q (..., K) float8_e4m3fn, scale (..., ceil(K/128)) float32, with
    x[..., k] ~= q[..., k] * scale[..., k // 128].
    """
    _check_input(x, "x")
    _check_scale_fmt(scale_fmt)
    *lead, K = x.shape
    nb = _n_blocks(K)
    x = x.float().reshape(-1, K)  # (R, K); reshape copies a non-contiguous input
    x_pad = torch.nn.functional.pad(x, (0, nb * BLOCK - K))  # (R, nb*128), zeros at the end
    tiles = x_pad.view(-1, nb, BLOCK)  # (R, nb, 128)
    scale = _scale_from_amax(tiles.abs().amax(dim=-1), scale_fmt)  # (R, nb)
    q = _to_fp8(tiles / scale[..., None]).view(-1, nb * BLOCK)[:, :K]  # (R, K)
    return q.contiguous().view(*lead, K), scale.view(*lead, nb)


def dequantize_act_1x128(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (..., K) float8_e4m3fn, scale (..., ceil(K/128)) -> float32 (..., K)."""
    _check_quantised(q, scale, "q")
    K = q.shape[-1]
    if scale.shape != (*q.shape[:-1], _n_blocks(K)):
        raise ValueError(f"scale must have shape {(*q.shape[:-1], _n_blocks(K))} for q of "
                         f"shape {tuple(q.shape)} (1x128 tiles), got {tuple(scale.shape)}")
    return q.float() * scale.repeat_interleave(BLOCK, dim=-1)[..., :K]


# ----------------------------------------------------------------------------- 128x128 blocks
def quantize_weight_128x128(w: torch.Tensor, scale_fmt: str = "fp32"):
    """Quantise a (out, in) matrix in 128x128 blocks (the checkpoints' ``weight_scale_inv``).

    w (N, K) -> q (N, K) float8_e4m3fn, scale_inv (ceil(N/128), ceil(K/128)) float32, with
    w[n, k] ~= q[n, k] * scale_inv[n // 128, k // 128].
    """
    _check_input(w, "w", min_dim=2)
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D (out_features, in_features) matrix, got shape "
                         f"{tuple(w.shape)}")
    _check_scale_fmt(scale_fmt)
    N, K = w.shape
    nbn, nbk = _n_blocks(N), _n_blocks(K)
    w_pad = torch.nn.functional.pad(w.float(), (0, nbk * BLOCK - K, 0, nbn * BLOCK - N))
    blocks = w_pad.view(nbn, BLOCK, nbk, BLOCK)  # (nbn, 128, nbk, 128)
    scale = _scale_from_amax(blocks.abs().amax(dim=(1, 3)), scale_fmt)  # (nbn, nbk)
    q = _to_fp8(blocks / scale[:, None, :, None]).view(nbn * BLOCK, nbk * BLOCK)[:N, :K]
    return q.contiguous(), scale


def dequantize_weight_128x128(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """q (N, K) float8_e4m3fn, scale_inv (ceil(N/128), ceil(K/128)) -> float32 (N, K)."""
    _check_quantised(q, scale_inv, "q")
    if q.dim() != 2 or scale_inv.shape != (_n_blocks(q.shape[0]), _n_blocks(q.shape[1])):
        raise ValueError(f"scale_inv must have shape (ceil(N/128), ceil(K/128)) for q of shape "
                         f"{tuple(q.shape)} (128x128 blocks), got {tuple(scale_inv.shape)}")
    N, K = q.shape
    full = scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:N, :K]
    return q.float() * full


def _dequantize_any(q: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """Dequantise a 2-D operand whose scale is either 1x128 tiles or 128x128 blocks.

    The two layouts are told apart by the scale's shape: (R, ceil(K/128)) for tiles,
    (ceil(R/128), ceil(K/128)) for blocks. They coincide only when R == 1, where a 1x128 tile
    and a 128x128 block restricted to one row are the same thing, so either reading is right.
    """
    _check_quantised(q, scale, name)
    if q.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(q.shape)}")
    R, K = q.shape
    if scale.shape == (R, _n_blocks(K)):
        return dequantize_act_1x128(q, scale)
    if scale.shape == (_n_blocks(R), _n_blocks(K)):
        return dequantize_weight_128x128(q, scale)
    raise ValueError(f"{name}'s scale has shape {tuple(scale.shape)}; expected {(R, _n_blocks(K))} "
                     f"(1x128 tiles) or {(_n_blocks(R), _n_blocks(K))} (128x128 blocks)")


# ----------------------------------------------------------------------------- the GEMM
def round_mantissa(x: torch.Tensor, bits: int, rounding: str = "truncate") -> torch.Tensor:
    """Round float32 x to `bits` explicit mantissa bits (bits + 1 significant bits).

    Works on the float32 bit pattern: clear the low 23 - bits mantissa bits ("truncate",
    toward zero) or add half of the dropped unit first ("nearest", ties away from zero). A
    carry out of the mantissa correctly bumps the exponent. Finite inputs only.
    """
    if not 0 <= bits <= 23:
        raise ValueError(f"accumulator bits must be in 0..23, got {bits}")
    if rounding not in ("truncate", "nearest"):
        raise ValueError(f"rounding must be 'truncate' or 'nearest', got {rounding!r}")
    if bits == 23:
        return x.float()
    drop = 23 - bits
    i = x.float().contiguous().view(torch.int32)
    if rounding == "nearest":
        i = i + (1 << (drop - 1))
    return (i & ~((1 << drop) - 1)).view(torch.float32)


def fp8_matmul_reference(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor,
                         w_scale: torch.Tensor, promote_every: int | None = 128,
                         accumulator_bits: int | None = None,
                         accumulator_rounding: str = "truncate") -> torch.Tensor:
    """y = dequant(a) @ dequant(w)^T, accumulated as an FP8 tensor-core GEMM would be.

    a_q (M, K) with a_scale (M, ceil(K/128)) [1x128 tiles] or 128x128 blocks;
    w_q (N, K) with w_scale (ceil(N/128), ceil(K/128)) [128x128 blocks] or 1x128 tiles.
    Returns y (M, N) float32.

    accumulator_bits None: float32 accumulation. Otherwise each promotion interval of
    `promote_every` products along K (None: all of K) is summed with the running partial sum
    rounded to `accumulator_bits` mantissa bits after each addition, and the intervals'
    partial sums are added in float32 (see the module docstring for what this models).
    """
    a = _dequantize_any(a_q, a_scale, "a_q")  # (M, K)
    w = _dequantize_any(w_q, w_scale, "w_q")  # (N, K)
    if a.shape[1] != w.shape[1]:
        raise ValueError(f"a_q (M, K) and w_q (N, K) must share K, got {tuple(a.shape)} and "
                         f"{tuple(w.shape)}")
    if promote_every is not None and promote_every < 1:
        raise ValueError(f"promote_every must be a positive int or None, got {promote_every}")
    if accumulator_bits is None:
        return a @ w.T  # (M, N), float32 throughout
    M, K = a.shape
    interval = K if promote_every is None else promote_every
    y = torch.zeros(M, w.shape[0])  # (M, N) the float32 accumulator
    for start in range(0, K, interval):
        partial = torch.zeros_like(y)  # (M, N) the limited-precision accumulator
        for k in range(start, min(start + interval, K)):
            product = a[:, k, None] * w[None, :, k]  # (M, N) exact in float32
            partial = round_mantissa(partial + product, accumulator_bits, accumulator_rounding)
        y += partial  # promotion: add the interval's partial sum in float32
    return y


# ----------------------------------------------------------------------------- the layer
class _Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T with Fprop, Dgrad and Wgrad as FP8 GEMMs (float32 accumulation)."""

    @staticmethod
    def forward(ctx, x2d, weight, scale_fmt):
        ctx.save_for_backward(x2d, weight)
        ctx.scale_fmt = scale_fmt
        x_q, x_s = quantize_act_1x128(x2d, scale_fmt)  # (M, K), (M, ceil(K/128))
        w_q, w_s = quantize_weight_128x128(weight, scale_fmt)  # (N, K), (ceil(N/128), ceil(K/128))
        return fp8_matmul_reference(x_q, x_s, w_q, w_s)  # (M, N)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight = ctx.saved_tensors
        fmt = ctx.scale_fmt
        grad_out = grad_out.float()  # (M, N)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # Dgrad: dx = dy @ W, reduce over N. dy in 1x128 tiles along N; W^T (K, N) has
            # the same 128x128 blocks as W, transposed.
            g_q, g_s = quantize_act_1x128(grad_out, fmt)  # (M, N), (M, ceil(N/128))
            w_q, w_s = quantize_weight_128x128(weight, fmt)
            grad_x = fp8_matmul_reference(g_q, g_s, w_q.T.contiguous(), w_s.T.contiguous())  # (M, K)
        if ctx.needs_input_grad[1]:
            # Wgrad: dW = dy^T @ x, reduce over M (tokens): both operands tiled along M,
            # i.e. 128x1 tiles of dy (M, N) and x (M, K).
            gt_q, gt_s = quantize_act_1x128(grad_out.T, fmt)  # (N, M), (N, ceil(M/128))
            xt_q, xt_s = quantize_act_1x128(x2d.T, fmt)  # (K, M), (K, ceil(M/128))
            grad_w = fp8_matmul_reference(gt_q, gt_s, xt_q, xt_s)  # (N, K)
        return grad_x, grad_w, None


class Fp8Linear(nn.Module):
    """A bias-free linear layer whose three GEMMs are simulated FP8 (e4m3, 1x128 / 128x128).

    The weight (out_features, in_features) is a float32 master copy that the optimiser
    updates; it is quantised in 128x128 blocks at every forward. Input x (..., in_features)
    of any supported float dtype; output (..., out_features) in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, scale_fmt: str = "fp32"):
        super().__init__()
        _check_scale_fmt(scale_fmt)
        self.in_features, self.out_features, self.scale_fmt = in_features, out_features, scale_fmt
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_fmt: str = "fp32") -> "Fp8Linear":
        if linear.bias is not None:
            raise ValueError("Fp8Linear has no bias; got an nn.Linear with one")
        layer = cls(linear.in_features, linear.out_features, scale_fmt)
        with torch.no_grad():
            layer.weight.copy_(linear.weight.float())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in in_features={self.in_features}, got shape "
                             f"{tuple(x.shape)}")
        *lead, K = x.shape
        y = _Fp8LinearFunction.apply(x.reshape(-1, K), self.weight, self.scale_fmt)  # (M, N)
        return y.to(x.dtype).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scale_fmt={self.scale_fmt!r}")
