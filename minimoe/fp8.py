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

The derivations live here; notebook 06 runs each idea on small tensors and shows the
committed results of the accumulation and training experiments.

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

Why e5m2 for gradients, elsewhere. e5m2 has the exponent field of float16: finite values
from 2^-16 to 57344, about 32 binades, against e4m3's 18 (2^-9 .. 448). The "hybrid" recipe
of Micikevicius et al. 2022 ("FP8 Formats for Deep Learning") and NVIDIA's Transformer
Engine uses e4m3 for weights and activations and e5m2 for activation *gradients*, whose
magnitudes spread over many more binades and drift during training; with one scale per
tensor (often a "delayed" scale taken from earlier steps' amax) range is what protects
them from overflow and underflow, and precision is what is given up: e5m2's relative
rounding error is up to 2^-3 = 12.5%, twice e4m3's. With one scale per 1x128 tile the
range a single scale must cover is that of 128 neighbouring numbers, which e4m3 holds, so
DeepSeek-V3 keeps the extra mantissa bit for gradients too. Every quantiser here takes
``fmt="e4m3" | "e5m2"`` (``FORMATS``); ``Fp8Linear(grad_fmt="e5m2")`` quantises the
gradients in e5m2 (the hybrid recipe) while activations and weights stay e4m3, with scale
s = amax / 57344. The spacing table above decides the rest: near the top of the format
e4m3 steps by 32 (256, 288, ..., 448) and e5m2 by 8192 (32768, 40960, 49152, 57344).

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
  values quantise to exact zeros. 1e-4 is the floor of DeepSeek's (inference) ``act_quant``
  and is harmless for activations and weights, whose tiles are far larger. It is *not*
  harmless for gradients: the gradient of a loss averaged over many tokens is tiny (in the
  toy, half of the gradient tiles have amax < 1e-4, some 1e-8), and a tile whose amax is
  below the floor is quantised on a scale up to 10^4 times too coarse, its small elements
  going subnormal or to zero. The backward passes therefore quantise gradients with
  ``GRAD_AMAX_FLOOR = 1e-30``, which only protects an all-zero tile (``Fp8Recipe.
  grad_amax_floor``; the 1x128 quantisers, which are the ones gradients go through, take
  ``amax_floor``; ``tests/test_fp8_training.py``
  shows the 1e-4 floor flushing gradient rows of 1e-11..1e-9 to zero and the small floor
  keeping every row within a few percent). Per-tile scales also make loss scaling
  unnecessary: each tile's scale follows its own magnitude, however small.
* Edge tiles. When K (or a weight dimension) is not a multiple of 128, conceptually pad
  with zeros up to the next multiple: the last tile is shorter, its amax is taken over the
  real elements only (zeros never raise an amax), and the scale tensors have ceil(n/128)
  entries along that dimension. The returned q has the input's shape, not the padded one.
* Inputs. float32, bfloat16, float16 and float64 are accepted (the arithmetic is done in
  float32); integer, bool, complex and already-FP8 tensors raise ``ValueError``, as do
  NaN / inf. Non-contiguous inputs (a transpose, a slice) are fine: q comes back contiguous.
  (The Triton kernels, ``minimoe.kernels.fp8_quant``, do not check for NaN / inf -- that
  would cost a pass and a host sync -- so on the kernel path a non-finite value in a tile
  makes that tile's scale, and the GEMM rows that read it, NaN: a diverged step still shows.)

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
one interval spanning all of K. The products are float32 products of the dequantised
operands: q_a q_w itself is exact (two e4m3 values have 4 significant bits each, so their
product has at most 8), and the scale factors, applied here per element instead of once per
interval, add one float32 rounding per product (none for ue8m0's power-of-two scales). ``accumulator_rounding`` chooses how the bits
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
forward, and the custom ``autograd.Function`` saves x and W in high precision. A bias, if
any, is added in float32 after the GEMM. The GEMMs always run in float32 on the dequantised
operands, also inside ``torch.autocast`` (which the functions switch off around them); the
result is returned in the autocast dtype when autocast is on (an FP8 GEMM writes BF16 in
DeepSeek-V3), else in x's dtype.

Routed experts: the grouped product
-----------------------------------
``RoutedExperts`` stores E weights stacked as (E, N, K), and ``minimoe.moe.dispatch_sorted``
multiplies each expert's contiguous block of expert-sorted rows by its own matrix.
``fp8_grouped_linear(rows, sizes, weight)`` is the FP8 version of that grouped product, with
the same three GEMMs per expert e (rows block X_e of m_e tokens, its gradient dY_e):

    Fprop   Y_e  = X_e  @ W_e^T   X in 1x128 tiles along K (per row: blind to the grouping),
                                  W_e in its own 128x128 blocks (scales (E, ceil(N/128), ceil(K/128)))
    Dgrad   dX_e = dY_e @ W_e     dY in 1x128 tiles along N, the blocks of W_e transposed
    Wgrad   dW_e = dY_e^T @ X_e   128x1 tiles of dY_e and X_e *inside the expert's block*:
                                  a tile never mixes the tokens of two experts

(a GPU grouped GEMM does the same: its Wgrad is E separate reductions over tokens.)
``Fp8RoutedExperts.grouped_swiglu`` is ``minimoe.moe.grouped_swiglu`` with these products.

FP8 training of a whole model
-----------------------------
``convert_to_fp8(model)`` (or ``ModelConfig(fp8=True)`` with ``minimoe.train``) follows
DeepSeek-V3's split (§3.3.1): the GEMMs of the experts (routed, shared, and the dense FFN of
the first layers) and the attention projections (q/k/v/o, MLA's low-rank projections, MTP's
``eh_proj``) run in FP8; the embedding, the output head, the MoE gate (router), the norms and
the attention operator itself (softmax(QK^T)V) stay in high precision, and so do the master
weights, gradients and optimiser states. It swaps every other ``nn.Linear`` for an
``Fp8Linear`` holding the same weight (same parameter names, so checkpoints load either way)
and marks every ``RoutedExperts`` with an ``Fp8Recipe``, which ``minimoe.moe`` and
``RoutedExperts.expert_forward`` check. ``python -m minimoe.experiments.fp8_training`` trains
BF16 and FP8 twins of the toy and compares their losses (the paper: relative loss error
below 0.25%).

The kernel path
---------------
When the kernel switch (``minimoe.kernel_switch``) chooses "triton" and the tensors can run
Triton (CUDA, or the CPU under ``TRITON_INTERPRET=1``), the activation quantiser is
``minimoe.kernels.fp8_quant.act_quant`` (gradients with their own amax floor) and all three
GEMMs are ``minimoe.kernels.fp8_gemm.fp8_gemm`` (for e4m3 operands; e5m2 gradients take the
reference path): Fprop and Dgrad with 128x128 weight blocks, Wgrad with the row-tiled x^T
as its second operand; the grouped product launches one GEMM per expert. Weights are
quantised by the PyTorch code here in both cases. The choice in effect during the forward
is remembered for the backward, which runs outside the model's ``use_kernels`` context.
The numbers are those of the reference up to float32 summation order
(``tests/test_kernels_fp8.py``; on a GPU also up to the tensor cores' own accumulation inside
each 128-long K block); only non-finite input differs: the kernel path returns NaN
where the reference raises.

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
* A whole model is far less sensitive than one GEMM: on the same weights, the toy's
  validation loss with every expert and attention-projection GEMM in FP8 is within 0.13% of
  BF16 (``python -m minimoe.experiments.fp8_training``, 3 seeds), although each GEMM is ~3.5%
  off. Trained FP8 and BF16 twins drift apart by a few percent over 200 steps (either sign,
  depending on the seed), about as much as FP32 and BF16 twins do: the toy's trajectories
  cannot resolve the paper's 0.25%, only the same-weights comparison can.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimoe import kernel_switch
from minimoe.experts import RoutedExperts

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
E5M2_MAX = torch.finfo(torch.float8_e5m2).max  # 57344.0
FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}  # fmt -> torch dtype
FORMAT_MAX = {"e4m3": FP8_MAX, "e5m2": E5M2_MAX}  # fmt -> largest finite value
BLOCK = 128  # tile length (activations) and block side (weights)
AMAX_FLOOR = 1e-4  # smallest amax a scale is computed from (DeepSeek's act_quant)
GRAD_AMAX_FLOOR = 1e-30  # the floor for gradients: only keeps an all-zero tile finite
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


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {tuple(FORMATS)}, got {fmt!r}")


def _check_quantised(q: torch.Tensor, scale: torch.Tensor, name: str) -> None:
    if not isinstance(q, torch.Tensor) or q.dtype not in FORMATS.values():
        raise ValueError(f"{name} must be a float8_e4m3fn or float8_e5m2 tensor, got "
                         f"{getattr(q, 'dtype', type(q).__name__)}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise ValueError(f"{name}'s scale must be a float32 tensor, got "
                         f"{getattr(scale, 'dtype', type(scale).__name__)}")


def _n_blocks(n: int) -> int:
    return -(-n // BLOCK)  # ceil(n / 128)


# ----------------------------------------------------------------------------- scales
def _check_amax_floor(amax_floor: float) -> None:
    if not (isinstance(amax_floor, (int, float)) and 1e-35 <= amax_floor < float("inf")):
        raise ValueError(f"amax_floor must be a number >= 1e-35 (the scale amax_floor / "
                         f"fmt_max must stay a normal float32), got {amax_floor!r}")


def _scale_from_amax(amax: torch.Tensor, scale_fmt: str, fmt: str = "e4m3",
                     amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """s = max(amax, floor) / fmt_max, or that rounded up to a power of two (ue8m0).

    The rounding works on the exact exponent (frexp: s = m 2^e, 0.5 <= m < 1), not on
    log2(s): a float32 log2 of a scale a few ulps above 2^k rounds to exactly k, and
    ceil(k) = k would round such a scale *down*, pushing the tile's amax past the format's max.
    """
    scale = amax.float().clamp_min(amax_floor) / FORMAT_MAX[fmt]
    if scale_fmt == "ue8m0":
        mantissa, exponent = torch.frexp(scale)
        scale = torch.where(mantissa == 0.5, scale, torch.exp2(exponent.float()))
    return scale


def _to_fp8(x_scaled: torch.Tensor, fmt: str = "e4m3") -> torch.Tensor:
    # x / s can exceed the format's max by a float32 rounding; clamp explicitly instead of
    # relying on torch's saturating cast (an implementation detail other backends do not
    # share; e5m2 would even overflow to inf).
    top = FORMAT_MAX[fmt]
    return x_scaled.clamp(-top, top).to(FORMATS[fmt])


# ----------------------------------------------------------------------------- per tensor
def quantize_per_tensor(x: torch.Tensor, scale_fmt: str = "fp32", fmt: str = "e4m3"):
    """One scale for the whole tensor. Returns (q float8 like x, scale () float32)."""
    _check_input(x, "x", min_dim=0)
    _check_scale_fmt(scale_fmt)
    _check_fmt(fmt)
    x = x.float()
    amax = x.abs().max() if x.numel() else torch.zeros((), device=x.device)
    scale = _scale_from_amax(amax, scale_fmt, fmt)  # ()
    return _to_fp8(x / scale, fmt), scale


def dequantize_per_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check_quantised(q, scale, "q")
    return q.float() * scale


# ----------------------------------------------------------------------------- 1x128 tiles
def quantize_act_1x128(x: torch.Tensor, scale_fmt: str = "fp32", fmt: str = "e4m3",
                       amax_floor: float = AMAX_FLOOR):
    """Quantise along the last dimension in tiles of 128 (DeepSeek's ``act_quant``).

    x (..., K) -> q (..., K) float8 (``FORMATS[fmt]``), scale (..., ceil(K/128)) float32,
    with x[..., k] ~= q[..., k] * scale[..., k // 128]. amax_floor: 1e-4 as in DeepSeek's
    kernel for activations; gradients need a far smaller one (``GRAD_AMAX_FLOOR``).
    """
    return _quantize_tiles(x, scale_fmt, fmt, amax_floor, "x")


def _quantize_tiles(x: torch.Tensor, scale_fmt: str, fmt: str, amax_floor: float, name: str):
    """``quantize_act_1x128``, with errors naming the tensor `name`."""
    _check_input(x, name)
    _check_scale_fmt(scale_fmt)
    _check_fmt(fmt)
    _check_amax_floor(amax_floor)
    *lead, K = x.shape
    nb = _n_blocks(K)
    if x.numel() == 0:  # no rows or K = 0: empty results of the right shapes
        return (torch.empty(x.shape, dtype=FORMATS[fmt], device=x.device),
                torch.empty((*lead, nb), dtype=torch.float32, device=x.device))
    # BEGIN SOLUTION fp8-act-quant
    x = x.float().reshape(-1, K)  # (R, K); reshape copies a non-contiguous input
    x_pad = F.pad(x, (0, nb * BLOCK - K))  # (R, nb*128), zeros at the end
    tiles = x_pad.view(-1, nb, BLOCK)  # (R, nb, 128)
    scale = _scale_from_amax(tiles.abs().amax(dim=-1), scale_fmt, fmt, amax_floor)  # (R, nb)
    q = _to_fp8(tiles / scale[..., None], fmt).view(-1, nb * BLOCK)[:, :K]  # (R, K)
    return q.contiguous().view(*lead, K), scale.view(*lead, nb)
    # END SOLUTION


def dequantize_act_1x128(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (..., K) float8, scale (..., ceil(K/128)) -> float32 (..., K)."""
    _check_quantised(q, scale, "q")
    K = q.shape[-1]
    if scale.shape != (*q.shape[:-1], _n_blocks(K)):
        raise ValueError(f"scale must have shape {(*q.shape[:-1], _n_blocks(K))} for q of "
                         f"shape {tuple(q.shape)} (1x128 tiles), got {tuple(scale.shape)}")
    return q.float() * scale.repeat_interleave(BLOCK, dim=-1)[..., :K]


# ----------------------------------------------------------------------------- 128x128 blocks
def _quantize_blocks(w: torch.Tensor, scale_fmt: str, fmt: str):
    """w (..., N, K) -> q (..., N, K), scale (..., ceil(N/128), ceil(K/128)); checked input."""
    *lead, N, K = w.shape
    nbn, nbk = _n_blocks(N), _n_blocks(K)
    if w.numel() == 0:  # every block is empty: the floor's scale, in the chosen scale format
        return (torch.empty(w.shape, dtype=FORMATS[fmt], device=w.device),
                _scale_from_amax(torch.zeros((*lead, nbn, nbk), device=w.device), scale_fmt, fmt))
    w_pad = F.pad(w.float(), (0, nbk * BLOCK - K, 0, nbn * BLOCK - N))  # (..., nbn*128, nbk*128)
    blocks = w_pad.reshape(-1, nbn, BLOCK, nbk, BLOCK)  # (L, nbn, 128, nbk, 128)
    scale = _scale_from_amax(blocks.abs().amax(dim=(2, 4)), scale_fmt, fmt)  # (L, nbn, nbk)
    q = _to_fp8(blocks / scale[:, :, None, :, None], fmt)  # (L, nbn, 128, nbk, 128)
    q = q.view(-1, nbn * BLOCK, nbk * BLOCK)[:, :N, :K].contiguous()  # (L, N, K)
    return q.view(*lead, N, K), scale.view(*lead, nbn, nbk)


def quantize_weight_128x128(w: torch.Tensor, scale_fmt: str = "fp32", fmt: str = "e4m3"):
    """Quantise a (out, in) matrix in 128x128 blocks (the checkpoints' ``weight_scale_inv``).

    w (N, K) -> q (N, K) float8, scale_inv (ceil(N/128), ceil(K/128)) float32, with
    w[n, k] ~= q[n, k] * scale_inv[n // 128, k // 128].
    """
    _check_input(w, "w", min_dim=2)
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D (out_features, in_features) matrix, got shape "
                         f"{tuple(w.shape)} (stacked expert weights: quantize_stacked_weights_128x128)")
    _check_scale_fmt(scale_fmt)
    _check_fmt(fmt)
    return _quantize_blocks(w, scale_fmt, fmt)


def quantize_stacked_weights_128x128(w: torch.Tensor, scale_fmt: str = "fp32",
                                     fmt: str = "e4m3"):
    """Quantise E stacked matrices (the routed experts' (E, N, K)), each in its own blocks.

    w (E, N, K) -> q (E, N, K) float8, scale_inv (E, ceil(N/128), ceil(K/128)) float32;
    q[e], scale_inv[e] == quantize_weight_128x128(w[e]). No block spans two experts.
    """
    _check_input(w, "w")
    if w.dim() != 3:
        raise ValueError(f"w must be (num_experts, out_features, in_features), got shape "
                         f"{tuple(w.shape)}")
    _check_scale_fmt(scale_fmt)
    _check_fmt(fmt)
    return _quantize_blocks(w, scale_fmt, fmt)


def dequantize_weight_128x128(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """q (N, K) float8, scale_inv (ceil(N/128), ceil(K/128)) -> float32 (N, K)."""
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
    Either operand may be e4m3 or e5m2. Returns y (M, N) float32.

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
    y = torch.zeros(M, w.shape[0], device=a.device)  # (M, N) the float32 accumulator
    for start in range(0, K, interval):
        partial = torch.zeros_like(y)  # (M, N) the limited-precision accumulator
        for k in range(start, min(start + interval, K)):
            product = a[:, k, None] * w[None, :, k]  # (M, N) one float32 rounding at most
            partial = round_mantissa(partial + product, accumulator_bits, accumulator_rounding)
        y += partial  # promotion: add the interval's partial sum in float32
    return y


# ----------------------------------------------------------------------------- which code runs
# The layer functions below quantise activations and multiply through these two functions: the
# Triton kernels when the kernel switch chooses "triton" and they can run here (e4m3 only),
# the PyTorch reference above otherwise.
def _quantize_act(x: torch.Tensor, scale_fmt: str, fmt: str = "e4m3",
                  amax_floor: float = AMAX_FLOOR, name: str = "x"):
    """1x128 tiles of x (..., K) along its last dim: act_quant kernel or quantize_act_1x128."""
    kernel = kernel_switch.fp8_act_quant_kernel(x) if fmt == "e4m3" else None
    if kernel is not None and x.dtype != torch.float64:
        return kernel(x.contiguous(), scale_fmt, amax_floor=amax_floor)
    return _quantize_tiles(x, scale_fmt, fmt, amax_floor, name)


_GRAD_NAME = "dy (the gradient of the FP8 product's output)"  # how errors name the gradient


def _gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor,
          w_scale: torch.Tensor) -> torch.Tensor:
    """(M, N) float32 = dequant(a) @ dequant(w)^T: the fp8_gemm kernel or the reference."""
    if a_q.dtype == w_q.dtype == FP8_DTYPE:
        kernel = kernel_switch.fp8_gemm_kernel(a_q)
        if kernel is not None:
            return kernel(a_q.contiguous(), a_scale.contiguous(), w_q.contiguous(),
                          w_scale.contiguous())
    return fp8_matmul_reference(a_q, a_scale, w_q, w_scale)


@contextlib.contextmanager
def _high_precision(device: torch.device):
    """No autocast inside: the simulated FP8 GEMM is a float32 matmul and must stay one."""
    if torch.amp.is_autocast_available(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def _result_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on for x's device (FP8 GEMMs write BF16), else x's."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


@dataclass(frozen=True)
class Fp8Recipe:
    """How the FP8 GEMMs of a module quantise: scale format, and the gradients' format."""

    scale_fmt: str = "fp32"  # "fp32" | "ue8m0"
    grad_fmt: str = "e4m3"  # "e4m3" (DeepSeek-V3) | "e5m2" (the hybrid recipe)
    grad_amax_floor: float = GRAD_AMAX_FLOOR  # floor of the gradients' tile amax

    def __post_init__(self) -> None:
        _check_scale_fmt(self.scale_fmt)
        _check_amax_floor(self.grad_amax_floor)
        if self.grad_fmt not in FORMATS:
            raise ValueError(f"grad_fmt must be one of {tuple(FORMATS)}, got {self.grad_fmt!r}")


# ----------------------------------------------------------------------------- the layer
class _Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T with Fprop, Dgrad and Wgrad as FP8 GEMMs (float32 accumulation)."""

    @staticmethod
    def forward(ctx, x2d, weight, recipe):
        ctx.save_for_backward(x2d, weight)
        ctx.recipe = recipe
        ctx.kernels = kernel_switch.current_kernels()  # the backward runs outside the model's choice
        with _high_precision(x2d.device):
            x_q, x_s = _quantize_act(x2d, recipe.scale_fmt)  # (M, K), (M, ceil(K/128))
            w_q, w_s = quantize_weight_128x128(weight, recipe.scale_fmt)  # (N, K), (ceil(N/128), ceil(K/128))
            return _gemm(x_q, x_s, w_q, w_s)  # (M, N) float32

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight = ctx.saved_tensors
        fmt, grad_fmt, floor = ctx.recipe.scale_fmt, ctx.recipe.grad_fmt, ctx.recipe.grad_amax_floor
        grad_x = grad_w = None
        with kernel_switch.use_kernels(ctx.kernels), _high_precision(x2d.device):
            grad_out = grad_out.float()  # (M, N)
            if ctx.needs_input_grad[0]:
                # Dgrad: dx = dy @ W, reduce over N. dy in 1x128 tiles along N; W^T (K, N) has
                # the same 128x128 blocks as W, transposed.
                g_q, g_s = _quantize_act(grad_out, fmt, grad_fmt, floor,
                                         _GRAD_NAME)  # (M, N), (M, ceil(N/128))
                w_q, w_s = quantize_weight_128x128(weight, fmt)
                grad_x = _gemm(g_q, g_s, w_q.T.contiguous(), w_s.T.contiguous())  # (M, K)
                grad_x = grad_x.to(x2d.dtype)
            if ctx.needs_input_grad[1]:
                # Wgrad: dW = dy^T @ x, reduce over M (tokens): both operands tiled along M,
                # i.e. 128x1 tiles of dy (M, N) and x (M, K).
                gt_q, gt_s = _quantize_act(grad_out.T, fmt, grad_fmt, floor,
                                           _GRAD_NAME)  # (N, M), (N, ceil(M/128))
                xt_q, xt_s = _quantize_act(x2d.T, fmt)  # (K, M), (K, ceil(M/128))
                grad_w = _gemm(gt_q, gt_s, xt_q, xt_s).to(weight.dtype)  # (N, K)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               recipe: Fp8Recipe = Fp8Recipe()) -> torch.Tensor:
    """F.linear(x, weight, bias) with its three GEMMs in simulated FP8.

    x (..., K) float; weight (N, K) high-precision master weight; bias (N,) or None, added
    in float32. Returns (..., N) in the autocast dtype under autocast, else in x's dtype.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("fp8_linear: x and weight must be tensors")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x (..., K) and weight (N, K) must share K, got shapes "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    *lead, K = x.shape
    N = weight.shape[0]
    y = _Fp8LinearFunction.apply(x.reshape(-1, K), weight, recipe)  # (M, N) float32
    if bias is not None:
        y = y + bias.float()
    return y.to(_result_dtype(x)).view(*lead, N)


class Fp8Linear(nn.Module):
    """A linear layer whose three GEMMs are simulated FP8 (e4m3, 1x128 / 128x128).

    The weight (out_features, in_features) is a float32 master copy that the optimiser
    updates; it is quantised in 128x128 blocks at every forward. Input x (..., in_features)
    of any supported float dtype; output (..., out_features) in x's dtype (in the autocast
    dtype under autocast). The optional bias stays high precision. grad_fmt="e5m2" quantises
    the gradients in e5m2 (the hybrid recipe) instead of e4m3 (DeepSeek-V3).
    """

    def __init__(self, in_features: int, out_features: int, scale_fmt: str = "fp32",
                 bias: bool = False, grad_fmt: str = "e4m3", device=None,
                 grad_amax_floor: float = GRAD_AMAX_FLOOR):
        super().__init__()
        self.recipe = Fp8Recipe(scale_fmt, grad_fmt, grad_amax_floor)
        self.in_features, self.out_features, self.scale_fmt = in_features, out_features, scale_fmt
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_fmt: str = "fp32", grad_fmt: str = "e4m3",
                    grad_amax_floor: float = GRAD_AMAX_FLOOR) -> "Fp8Linear":
        """An Fp8Linear holding a float32 copy of linear's weight (and bias) on its device.

        Leaves the global random state untouched (the throwaway initialisation runs in a
        forked RNG), so converting a model does not shift the random numbers drawn after it.
        """
        with torch.random.fork_rng(devices=[]):
            layer = cls(linear.in_features, linear.out_features, scale_fmt,
                        bias=linear.bias is not None, grad_fmt=grad_fmt,
                        device=linear.weight.device, grad_amax_floor=grad_amax_floor)
        with torch.no_grad():
            layer.weight.copy_(linear.weight.float())
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.float())
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in in_features={self.in_features}, got shape "
                             f"{tuple(x.shape)}")
        return fp8_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scale_fmt={self.scale_fmt!r}, "
                f"grad_fmt={self.recipe.grad_fmt!r}")


# ----------------------------------------------------------------------------- routed experts
def _group_bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """[(start, end)] of each expert's block of rows: sizes (3, 0, 2) -> [(0,3), (3,3), (3,5)]."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


class _Fp8GroupedLinearFunction(torch.autograd.Function):
    """Block e of rows times weight[e]^T, each of the three GEMMs in simulated FP8."""

    @staticmethod
    def forward(ctx, rows, weight, sizes, recipe):
        ctx.save_for_backward(rows, weight)
        ctx.sizes, ctx.recipe = sizes, recipe
        ctx.kernels = kernel_switch.current_kernels()
        with _high_precision(rows.device):
            x_q, x_s = _quantize_act(rows, recipe.scale_fmt)  # (M, K), (M, ceil(K/128))
            w_q, w_s = quantize_stacked_weights_128x128(weight, recipe.scale_fmt)  # (E, N, K), (E, nbn, nbk)
            blocks = [_gemm(x_q[start:end], x_s[start:end], w_q[e], w_s[e])  # (m_e, N)
                      for e, (start, end) in enumerate(_group_bounds(sizes))]
            return torch.cat(blocks)  # (M, N) float32

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight = ctx.saved_tensors
        fmt, grad_fmt, floor = ctx.recipe.scale_fmt, ctx.recipe.grad_fmt, ctx.recipe.grad_amax_floor
        bounds = _group_bounds(ctx.sizes)
        grad_rows = grad_weight = None
        with kernel_switch.use_kernels(ctx.kernels), _high_precision(rows.device):
            grad_out = grad_out.float()  # (M, N)
            w_q, w_s = quantize_stacked_weights_128x128(weight, fmt)  # (E, N, K), (E, nbn, nbk)
            if ctx.needs_input_grad[0]:
                # Dgrad: dX_e = dY_e @ W_e; dY in 1x128 tiles along N (per row), W_e^T's blocks
                g_q, g_s = _quantize_act(grad_out, fmt, grad_fmt, floor,
                                         _GRAD_NAME)  # (M, N), (M, ceil(N/128))
                grad_rows = torch.cat([
                    _gemm(g_q[start:end], g_s[start:end], w_q[e].T.contiguous(),
                          w_s[e].T.contiguous())  # (m_e, K)
                    for e, (start, end) in enumerate(bounds)]).to(rows.dtype)  # (M, K)
            if ctx.needs_input_grad[1]:
                # Wgrad: dW_e = dY_e^T @ X_e, reduce over expert e's tokens: 128x1 tiles that
                # start at the expert's first row and never reach into the next expert's rows
                grads = []
                for start, end in bounds:
                    if end == start:  # nobody chose this expert: no tokens, zero gradient
                        grads.append(torch.zeros(weight.shape[1:], device=weight.device))
                        continue
                    gt_q, gt_s = _quantize_act(grad_out[start:end].T, fmt, grad_fmt, floor,
                                               _GRAD_NAME)  # (N, m_e)
                    xt_q, xt_s = _quantize_act(rows[start:end].T, fmt)  # (K, m_e)
                    grads.append(_gemm(gt_q, gt_s, xt_q, xt_s))  # (N, K)
                grad_weight = torch.stack(grads).to(weight.dtype)  # (E, N, K)
        return grad_rows, grad_weight, None, None


def fp8_grouped_linear(rows: torch.Tensor, sizes: Sequence[int], weight: torch.Tensor,
                       recipe: Fp8Recipe = Fp8Recipe()) -> torch.Tensor:
    """The grouped product of ``minimoe.moe`` in simulated FP8.

    rows (M, K) sorted by expert in E contiguous blocks of ``sizes`` rows (zeros allowed);
    weight (E, N, K) stacked master weights. Returns (M, N), block e = rows_e @ weight[e]^T,
    in the autocast dtype under autocast, else in rows' dtype.
    """
    sizes = tuple(int(size) for size in sizes)
    if rows.dim() != 2 or weight.dim() != 3 or rows.shape[1] != weight.shape[2]:
        raise ValueError(f"fp8_grouped_linear: rows (M, K) and weight (E, N, K) must share K, "
                         f"got shapes {tuple(rows.shape)} and {tuple(weight.shape)}")
    if len(sizes) != weight.shape[0] or sum(sizes) != rows.shape[0] or min(sizes, default=0) < 0:
        raise ValueError(f"fp8_grouped_linear: sizes must be {weight.shape[0]} non-negative "
                         f"counts summing to {rows.shape[0]} rows, got {sizes}")
    y = _Fp8GroupedLinearFunction.apply(rows, weight, sizes, recipe)  # (M, N) float32
    return y.to(_result_dtype(rows))


class Fp8RoutedExperts(RoutedExperts):
    """``RoutedExperts`` whose three products per expert run in FP8 (``fp8_recipe``).

    The same parameters under the same names (so checkpoints and optimisers see no
    difference); ``expert_forward`` (the naive dispatch) and ``grouped_swiglu`` (the sorted
    dispatch, ``minimoe.moe.grouped_swiglu`` with the grouped FP8 products above) replace the
    high-precision products. ``convert_to_fp8`` swaps it in, as it swaps ``Fp8Linear`` in for
    ``nn.Linear``; ``from_experts`` shares the original's Parameter objects.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 init_std: float = 0.02, recipe: Optional[Fp8Recipe] = None) -> None:
        super().__init__(num_experts, hidden_size, intermediate_size, init_std)
        self.fp8_recipe = recipe or Fp8Recipe()

    @classmethod
    def from_experts(cls, experts: RoutedExperts, recipe: Fp8Recipe) -> "Fp8RoutedExperts":
        with torch.device("meta"):  # no memory for weights that are replaced at once
            fp8_experts = cls(experts.num_experts, experts.hidden_size,
                              experts.intermediate_size, experts.init_std, recipe)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(fp8_experts, name, getattr(experts, name))  # the same Parameter objects
        return fp8_experts.train(experts.training)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens with FP8 products: x (n, C) -> (n, C)."""
        gate = fp8_linear(x, self.gate_proj[e], recipe=self.fp8_recipe)  # (n, I)
        up = fp8_linear(x, self.up_proj[e], recipe=self.fp8_recipe)  # (n, I)
        return fp8_linear(F.silu(gate) * up, self.down_proj[e], recipe=self.fp8_recipe)  # (n, C)

    def grouped_swiglu(self, rows: torch.Tensor, counts: torch.Tensor,
                       row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``minimoe.moe.grouped_swiglu`` with FP8 grouped products: (M, C) -> (M, C).

        rows sorted by expert, counts (E,) rows per expert, row_scale (M,) or None multiplies
        each row's hidden activation before the down projection.
        """
        sizes = counts.tolist()  # rows per expert, as Python ints
        gate = fp8_grouped_linear(rows, sizes, self.gate_proj, self.fp8_recipe)  # (M, I)
        up = fp8_grouped_linear(rows, sizes, self.up_proj, self.fp8_recipe)  # (M, I)
        hidden = F.silu(gate) * up  # (M, I)
        if row_scale is not None:
            hidden = (hidden * row_scale.unsqueeze(-1)).to(hidden.dtype)  # (M, I)
        return fp8_grouped_linear(hidden, sizes, self.down_proj, self.fp8_recipe)  # (M, C)


# ----------------------------------------------------------------------------- whole models
HIGH_PRECISION_LINEARS = ("lm_head",)  # nn.Linear children that convert_to_fp8 leaves alone


def convert_to_fp8(model: nn.Module, scale_fmt: str = "fp32", grad_fmt: str = "e4m3",
                   grad_amax_floor: float = GRAD_AMAX_FLOOR) -> list[str]:
    """Switch a model's expert and attention-projection GEMMs to FP8, in place.

    Every ``nn.Linear`` except the output head (``HIGH_PRECISION_LINEARS``) becomes an
    ``Fp8Linear`` holding a float32 copy of the same weight under the same names; every
    ``RoutedExperts`` becomes an ``Fp8RoutedExperts`` sharing its parameters. Embedding,
    output head, router, norms and the attention operator are untouched. Build the optimiser
    *after* converting (the converted linear layers hold new Parameter objects). Returns the
    converted modules' names.
    """
    recipe = Fp8Recipe(scale_fmt, grad_fmt, grad_amax_floor)
    converted = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Linear and name not in HIGH_PRECISION_LINEARS:
                setattr(parent, name, Fp8Linear.from_linear(child, scale_fmt, grad_fmt,
                                                            grad_amax_floor))
                converted.append(full_name)
            elif type(child) is RoutedExperts:
                setattr(parent, name, Fp8RoutedExperts.from_experts(child, recipe))
                converted.append(full_name)
    return sorted(converted)
