"""RMSNorm: the normalisation every model in minimoe uses, everywhere.

The idea
--------
A residual stream that flows through dozens of blocks drifts in scale. LayerNorm (Ba et
al. 2016) fixes that by subtracting the mean and dividing by the standard deviation of
each token's vector, then applying a learned gain and bias. Zhang & Sennrich (2019, "Root
Mean Square Layer Normalization", §3) observed that the *re-centring* buys almost
nothing: dividing by the root mean square alone keeps training stable and is cheaper.
That is RMSNorm:

    rms(x)  = sqrt( mean_i(x_i^2) + eps )
    y_i     = x_i / rms(x) * weight_i

with one learned gain ``weight`` per channel (initialised to ones, so a fresh RMSNorm
only rescales) and no bias. Every model minimoe teaches uses it:

* before attention and before the FFN / MoE block of every layer (pre-norm);
* inside MLA, on the compressed query and key/value latents (``q_a_layernorm``,
  ``kv_a_layernorm``; DeepSeek-V2 §2.1.2): the up-projections see unit-scale inputs;
* as QK-norm, on queries and keys before the dot product (Dehghani et al. 2023,
  OLMoE, Qwen3, Ling-2.0; see ``minimoe.attention``);
* in the MTP modules (``enorm``, ``hnorm``; DeepSeek-V3 §2.2).

What the reader should notice
-----------------------------
* The statistic is computed in float32 even when activations are bf16: squaring bf16
  values and averaging thousands of them in bf16 (8 bits of mantissa) loses the small
  ones. We upcast, normalise, multiply by the gain and cast back to the input dtype.
  (Hugging Face's Llama/DeepSeek RMSNorm casts back *before* multiplying by the gain;
  with a float32 gain the two orders differ only by the final rounding.)
* ``eps`` sits inside the square root: it only matters for vectors that are almost
  zero, and keeps their gradient finite.
* The gain is a parameter named ``weight`` so that checkpoint tensors such as
  ``model.layers.0.input_layernorm.weight`` load without renaming.
* With ``ModelConfig.kernels = "triton"`` the forward runs ``minimoe.kernels.rmsnorm``
  instead, one fused Triton kernel (see ``minimoe.kernel_switch``); the code below is the
  reference it is tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from minimoe import kernel_switch


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2, last dim) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm dim must be > 0, got {dim}")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (dim,) learned gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = kernel_switch.rmsnorm_kernel(x)  # None unless kernels="triton" can run here
        if kernel is not None:
            return kernel(x, self.weight, self.eps)  # minimoe.kernels.rmsnorm: one fused kernel
        input_dtype = x.dtype
        x32 = x.float()  # (..., dim) statistics in float32
        mean_square = x32.pow(2).mean(dim=-1, keepdim=True)  # (..., 1)
        normed = x32 * torch.rsqrt(mean_square + self.eps)  # (..., dim) unit RMS
        return (normed * self.weight.float()).to(input_dtype)  # (..., dim)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
