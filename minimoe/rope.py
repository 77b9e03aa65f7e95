"""Rotary position embeddings: RoPE, partial RoPE, linear interpolation, NTK-aware scaling, YaRN.

The derivations live here; notebook 04 plots each method on DeepSeek-V3's numbers and
measures them on a toy trained at 128 bytes.

How RoPE works
--------------
Attention scores are dot products q_m . k_n between a query at position m and a key at
position n. RoPE (Su et al. 2021, "RoFormer", §3.2; derivation and the element-wise
realisation in §3.4) encodes positions by *rotating* queries and keys instead of adding
anything to the token embeddings. Split a head vector of rotary_dim numbers into
rotary_dim/2 pairs; rotate pair i of the vector at position m by the angle m * f_i, with
one frequency per pair

    f_i = theta ^ (-2i / rotary_dim),   i = 0 .. rotary_dim/2 - 1   (theta = rope_theta)

A rotation R(a) satisfies R(a)^T R(b) = R(b - a), so

    (R(m f) q) . (R(n f) k) = q^T R((n - m) f) k

depends on m and n only through n - m: attention becomes *relative* for free, and a
key cached at step n never needs recomputing (see minimoe.cache). Pair 0 turns once per
token (short wavelength, local order); the last pair turns slowly (wavelength up to
2 pi theta tokens, long-range position).

Two layouts of the same idea
----------------------------
Which numbers form a pair is a convention, and checkpoints differ:

* rotate-half (GPT-NeoX, Llama, Hugging Face default): pair i = (x[i], x[i + d/2]).
  With cos = [cos(m f), cos(m f)] and sin likewise (frequencies concatenated twice),
      rope(x) = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]
  This is ``apply_rotary``.
* interleaved (the RoFormer paper, DeepSeek's original inference/model.py): pair i =
  (x[2i], x[2i + 1]), viewed as one complex number and multiplied by e^{i m f_i}.
  This is ``apply_rotary_interleaved``.

They differ only by a fixed permutation of the rotary dims,
``interleaved_to_half_permutation``: perm = [0, 2, 4, ..., 1, 3, 5, ...]. If a projection
W produces interleaved-layout queries, the projection W[perm] (rows permuted) produces
rotate-half queries, and scores are unchanged because q and k are permuted alike. This is
how checkpoints trained with one layout load into code written for the other (transformers'
DeepSeek-V3 does the same permutation at run time when ``rope_interleave`` is true).
``permute_rotary_rows`` applies it to a projection's rows head by head, touching only the
rotary rows (for MLA's q_b_proj those come after the qk_nope_head_dim rows of each head).

Partial RoPE
------------
Nothing forces every dimension to rotate. GPT-NeoX rotates only the first quarter of each
head (rotary_pct); Ling-2.0 rotates half (partial_rotary_factor 0.5): the first
rotary_dim = head_dim * partial_rotary_factor dims rotate, the rest pass through
unchanged and carry position-free content matching. MLA (DeepSeek-V2 §2.1.3) is the
extreme version: a separate small ``qk_rope_head_dim`` part carries all position
information, which is what lets the rest of the key be compressed (minimoe.mla).
``apply_rotary`` therefore takes x of width D >= rotary_dim and rotates only the first
rotary_dim dims.

Longer contexts: linear interpolation, NTK-aware scaling and YaRN
-----------------------------------------------------------------
A model trained on L positions has never seen the angles of positions beyond L.
*Linear* position interpolation (Chen et al. 2023; kaiokendev) squeezes positions,
m -> m / s for a factor s, so that s*L positions map into the trained range; equivalently
every f_i is divided by s. It also blurs nearby tokens, because high frequencies get
slow too. (rope_scaling {"type": "linear", "factor": s}.)

*NTK-aware* scaling (bloc97, reddit r/LocalLLaMA, June 2023; YaRN paper §3.2) changes the
base instead of the positions: theta' = theta * s^(d / (d - 2)) with d = rotary_dim. The
exponent is chosen so that the *lowest* frequency, f_{d/2-1} = theta^(-(d-2)/d), is
divided by exactly s (interpolated like linear scaling), while f_0 = 1 is untouched
(extrapolated) and the pairs in between are divided by s^(2i/(d-2)), a geometric blend.
High frequencies keep their resolution, which is why it works reasonably well *without*
fine-tuning. Its weakness (YaRN §3.2): some middle pairs are still extrapolated to angles
never seen in training, and the blend is fixed by the index rather than by what the model
saw. (rope_scaling {"type": "ntk", "factor": s}; the name is minimoe's, transformers has
only the dynamic variant below.)

*Dynamic* NTK (emozilla; transformers ``rope_type="dynamic"``) applies the same formula
with a factor recomputed from the current length T (the largest position + 1): while
T <= L nothing changes, beyond it

    s(T) = factor * T / L - (factor - 1),   theta' = theta * s(T)^(d / (d - 2))

so a short prompt sees the original frequencies and a long one gets just enough scaling.
The catch: keys already in a KV cache were rotated with the old frequencies, so cached and
fresh keys disagree once T crosses L (transformers accepts this too). Here the frequencies
are recomputed in ``forward`` from max(positions) + 1.

YaRN (Peng et al. 2023, §3) interpolates *by parts* ("NTK-by-parts", §3.3): a pair whose
wavelength is short compared with L has seen every angle many times during training and
is left alone (extrapolated); a pair whose wavelength exceeds L is interpolated (divided
by s); a linear ramp joins the two. The ramp is placed by counting rotations over the
original context L (``original_max_position_embeddings``). Pair i turns
L / (2 pi theta^(2i/rotary_dim)) times over L, so the (fractional) pair that turns exactly
r times is

    corr_dim(r) = rotary_dim * ln(L / (2 pi r)) / (2 ln theta)
    low  = floor(corr_dim(beta_fast)),  high = ceil(corr_dim(beta_slow)),
    both clamped to [0, rotary_dim - 1]
    ramp_i = clamp((i - low) / (high - low), 0, 1)
    f_i'   = f_i / s * ramp_i + f_i * (1 - ramp_i)

(beta_fast = 32 and beta_slow = 1 rotations by default). YaRN also sharpens attention,
whose entropy grows with context, by a temperature: logits are multiplied by
mscale(s)^2 where

    mscale(s, m) = 0.1 * m * ln(s) + 1      (1 when s <= 1)

For DeepSeek-V3 (rope_scaling factor 40, L = 4096, rotary_dim 64, theta 1e4): corr_dim(32)
= 10.47 and corr_dim(1) = 22.51, so low = 10 and high = 23; pairs 0..10 keep their
frequency, pairs 23..31 are divided by 40; mscale(40, 1) = 1.368888.

Where the temperature goes: two conventions, selected by the config keys
---------------------------------------------------------------------------
``RotaryEmbedding`` exposes two numbers: ``cos_sin_scale`` (multiplies cos and sin, so it
scales the *rotated* part of q and of k, hence the logits by its square on those dims)
and ``attention_scale_multiplier`` (multiplies the softmax scale, i.e. *all* logits).

* DeepSeek convention: ``mscale`` and ``mscale_all_dim`` both present and non-zero
  (DeepSeek-V2/V3, Kimi-K2). The softmax scale becomes
  qk_head_dim^-0.5 * mscale(s, mscale_all_dim)^2 (``attention_scale_multiplier``), and
  cos/sin are multiplied by mscale(s, mscale) / mscale(s, mscale_all_dim) (1 for V3,
  where both are 1.0). Since MLA rotates only 64 of 192 query/key dims, putting the
  temperature in the softmax scale sharpens every dim, not just the rotated ones.
* Hugging Face default (YaRN configs without those keys, e.g. Qwen): cos/sin are
  multiplied by ``attention_factor`` if the config gives it, else by mscale(s, 1) =
  0.1 ln(s) + 1, and the softmax scale is untouched (``attention_scale_multiplier``
  = 1). This is the YaRN paper's own sqrt(1/t) trick: scale q and k, not the softmax.

These rules follow transformers' ``_compute_yarn_parameters`` (cos/sin factor) and
``DeepseekV3Attention`` (softmax multiplier: mscale_all_dim alone decides it). DeepSeek's
original inference/model.py folds mscale into its softmax scale the same way; it enables
YaRN only when the run's max_seq_len exceeds the original length, whereas here, as in
transformers, a YaRN config always applies. Other keys: ``truncate`` (default true: round
low/high to integers) as in transformers.

Where each factor lands (a summary)
-----------------------------------
    method   frequencies f_i                          cos/sin factor    softmax scale factor
    default  theta^(-2i/d)                            1                 1
    linear   f_i / s                                  1                 1
    ntk      (theta s^(d/(d-2)))^(-2i/d)              1                 1
    dynamic  as ntk with s(T), only when T > L        1                 1
    yarn     ramp blend of f_i and f_i / s            mscale(s,m)/      mscale(s,m_all)^2
             (low/high from beta_fast/beta_slow)      mscale(s,m_all)   (DeepSeek keys)
                                                      or mscale(s,1)    or 1 (HF default)

A cos/sin factor c multiplies the logits by c^2, but only through the rotated dims (both
q and k carry one c); the softmax factor multiplies every logit. The two are the same
thing when every dim rotates, and different under partial RoPE and MLA.

What the reader should notice
-----------------------------
* cos and sin are float32 whatever the model dtype: angles like 160000 * f_0 need the
  mantissa. ``apply_rotary`` rotates in float32 and casts back to the input dtype.
* RoPE has no parameters: ``inv_freq`` is a non-persistent buffer, absent from
  checkpoints.
* Only the *query-key* dot product is rotated; values never are.
* With ``ModelConfig.kernels = "triton"``, ``apply_rotary`` runs ``minimoe.kernels.rope``
  (one fused Triton kernel, see ``minimoe.kernel_switch``); the code here is its reference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minimoe import kernel_switch

IMPLEMENTED_SCALINGS = ("default", "linear", "ntk", "dynamic", "yarn")


# ---------------------------------------------------------------------------------------------
# Frequencies
# ---------------------------------------------------------------------------------------------


def default_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """f_i = theta^(-2i / rotary_dim) for i = 0 .. rotary_dim/2 - 1, shape (rotary_dim/2,)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (theta**exponents)  # (rotary_dim/2,)


def ntk_theta(theta: float, factor: float, rotary_dim: int) -> float:
    """NTK-aware base: theta * factor^(d / (d - 2)), so the slowest pair is divided by factor."""
    if rotary_dim <= 2:
        raise ValueError(f"NTK-aware scaling needs rotary_dim > 2, got {rotary_dim}")
    return theta * factor ** (rotary_dim / (rotary_dim - 2))


def dynamic_ntk_factor(factor: float, seq_len: int, original_max_position_embeddings: int) -> float:
    """The factor dynamic NTK uses at length seq_len: 1 up to L, then factor * T / L - (factor - 1)."""
    if seq_len <= original_max_position_embeddings:
        return 1.0
    return factor * seq_len / original_max_position_embeddings - (factor - 1)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's temperature factor 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    # BEGIN SOLUTION yarn
    return 0.1 * mscale * math.log(scale) + 1.0
    # END SOLUTION


def yarn_correction_dim(num_rotations: float, rotary_dim: int, theta: float,
                        original_max_position_embeddings: int) -> float:
    """The (fractional) pair index that turns num_rotations times over the original context."""
    turns = original_max_position_embeddings / (num_rotations * 2 * math.pi)
    return rotary_dim * math.log(turns) / (2 * math.log(theta))


def yarn_correction_range(beta_fast: float, beta_slow: float, rotary_dim: int, theta: float,
                          original_max_position_embeddings: int,
                          truncate: bool = True) -> tuple[float, float]:
    """(low, high): below low pairs extrapolate, above high they interpolate."""
    low = yarn_correction_dim(beta_fast, rotary_dim, theta, original_max_position_embeddings)
    high = yarn_correction_dim(beta_slow, rotary_dim, theta, original_max_position_embeddings)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, rotary_dim - 1)


def _scaling_kind(rope_scaling: dict | None) -> str:
    if rope_scaling is None:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type")) or "default"


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, in the rotate-half layout; see the module docstring.

    forward(positions (T,)) -> (cos, sin), each (T, rotary_dim) float32, already multiplied
    by ``cos_sin_scale``. ``attention_scale_multiplier`` is the factor the attention layer
    applies to its softmax scale (1.0 except for DeepSeek-style YaRN).
    """

    def __init__(self, rotary_dim: int, theta: float, max_position_embeddings: int,
                 rope_scaling: dict | None = None) -> None:
        super().__init__()
        if rotary_dim <= 0 or rotary_dim % 2 != 0:
            raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        self.theta = float(theta)
        self.max_position_embeddings = max_position_embeddings
        self.rope_scaling = dict(rope_scaling) if rope_scaling is not None else None
        self.scaling_kind = _scaling_kind(rope_scaling)
        self.cos_sin_scale = 1.0  # HF: attention_factor / attention_scaling
        self.attention_scale_multiplier = 1.0  # multiplies the softmax scale
        self.yarn_low: float | None = None
        self.yarn_high: float | None = None

        inv_freq = default_inv_freq(rotary_dim, self.theta)  # (rotary_dim/2,)
        if self.scaling_kind == "default":
            pass
        elif self.scaling_kind == "linear":
            # Positions m -> m / s; since angle = m * f, dividing f by s is the same thing.
            inv_freq = inv_freq / float(rope_scaling["factor"])
        elif self.scaling_kind == "ntk":
            # A larger base: every pair slows down by factor^(2i / (d - 2)), the last by factor.
            inv_freq = default_inv_freq(rotary_dim, ntk_theta(self.theta, float(rope_scaling["factor"]),
                                                              rotary_dim))
        elif self.scaling_kind == "dynamic":
            # Frequencies depend on the length: recomputed in forward once it exceeds L.
            ntk_theta(self.theta, 1.0, rotary_dim)  # the same rotary_dim check as "ntk"
            self.dynamic_original = int(rope_scaling.get("original_max_position_embeddings")
                                        or max_position_embeddings)
        elif self.scaling_kind == "yarn":
            inv_freq = self._init_yarn(inv_freq, rope_scaling)
        else:
            raise NotImplementedError(
                f"rope_scaling['type'] = {self.scaling_kind!r} is not implemented yet; "
                f"supported: {', '.join(IMPLEMENTED_SCALINGS)}"
            )
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (rotary_dim/2,)

    def _init_yarn(self, inv_freq: torch.Tensor, rope_scaling: dict) -> torch.Tensor:
        factor = float(rope_scaling["factor"])
        original = rope_scaling.get("original_max_position_embeddings") or self.max_position_embeddings
        beta_fast = rope_scaling.get("beta_fast") or 32
        beta_slow = rope_scaling.get("beta_slow") or 1
        mscale = rope_scaling.get("mscale")
        mscale_all_dim = rope_scaling.get("mscale_all_dim")

        # BEGIN SOLUTION yarn
        # 1. the ramp: 0 for fast pairs (keep f_i), 1 for slow pairs (f_i / s)
        low, high = yarn_correction_range(beta_fast, beta_slow, self.rotary_dim, self.theta,
                                          original, rope_scaling.get("truncate", True))
        self.yarn_low, self.yarn_high = low, high
        if low == high:
            high = high + 0.001  # avoid 0/0 when the ramp degenerates to a step
        pair_index = torch.arange(self.rotary_dim // 2, dtype=torch.float32)  # (rotary_dim/2,)
        ramp = ((pair_index - low) / (high - low)).clamp(0, 1)  # (rotary_dim/2,)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)  # (rotary_dim/2,)
        # END SOLUTION

        # 2. the temperature: which knob carries it depends on the config keys
        if rope_scaling.get("attention_factor") is not None:
            self.cos_sin_scale = float(rope_scaling["attention_factor"])
        elif mscale and mscale_all_dim:
            self.cos_sin_scale = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            self.cos_sin_scale = yarn_mscale(factor)
        if mscale_all_dim:
            self.attention_scale_multiplier = yarn_mscale(factor, mscale_all_dim) ** 2
        return inv_freq

    def inv_freq_for_length(self, seq_len: int) -> torch.Tensor:
        """The frequencies used for a sequence of seq_len positions (only "dynamic" depends on it)."""
        if self.scaling_kind != "dynamic":
            return self.inv_freq
        factor = dynamic_ntk_factor(float(self.rope_scaling["factor"]), seq_len, self.dynamic_original)
        if factor == 1.0:
            return self.inv_freq
        theta = ntk_theta(self.theta, factor, self.rotary_dim)
        return default_inv_freq(self.rotary_dim, theta).to(self.inv_freq.device)  # (rotary_dim/2,)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = positions.to(device=self.inv_freq.device, dtype=torch.float32)  # (T,)
        inv_freq = self.inv_freq
        if self.scaling_kind == "dynamic" and positions.numel() > 0:
            inv_freq = self.inv_freq_for_length(int(positions.max().item()) + 1)
        angles = positions[:, None] * inv_freq[None, :]  # (T, rotary_dim/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, rotary_dim) rotate-half layout
        cos = angles.cos() * self.cos_sin_scale  # (T, rotary_dim)
        sin = angles.sin() * self.cos_sin_scale  # (T, rotary_dim)
        return cos, sin

    def extra_repr(self) -> str:
        return (f"rotary_dim={self.rotary_dim}, theta={self.theta}, scaling={self.scaling_kind}, "
                f"cos_sin_scale={self.cos_sin_scale:.6f}, "
                f"attention_scale_multiplier={self.attention_scale_multiplier:.6f}")


# ---------------------------------------------------------------------------------------------
# Applying the rotation
# ---------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim: pair i = (x[i], x[i + d/2]) turned by 90 degrees."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., d/2) each
    return torch.cat([-x2, x1], dim=-1)  # (..., d)


def _check_rotary_width(x: torch.Tensor, cos: torch.Tensor) -> int:
    rotary_dim = cos.shape[-1]
    if x.shape[-1] < rotary_dim:
        raise ValueError(f"head width {x.shape[-1]} is smaller than rotary_dim {rotary_dim}")
    return rotary_dim


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of x (rotate-half layout); pass the rest through.

    x: (B, H, T, D) with D >= rotary_dim; cos, sin: (T, rotary_dim) from RotaryEmbedding.
    Computed in float32, returned in x.dtype.
    """
    rotary_dim = _check_rotary_width(x, cos)
    kernel = kernel_switch.rotary_kernel(x)  # None unless kernels="triton" can run here
    if kernel is not None and cos.dim() == 2 and cos.shape[0] == x.shape[-2]:
        return kernel(x, cos, sin)  # minimoe.kernels.rope: one fused kernel
    x_rot = x[..., :rotary_dim].float()  # (B, H, T, rotary_dim)
    x_pass = x[..., rotary_dim:]  # (B, H, T, D - rotary_dim) untouched
    rotated = x_rot * cos + rotate_half(x_rot) * sin  # (B, H, T, rotary_dim)
    return torch.cat([rotated.to(x.dtype), x_pass], dim=-1)  # (B, H, T, D)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation in the interleaved (complex-pair) layout of DeepSeek's inference code.

    Pair i is (x[2i], x[2i+1]) = x[2i] + j x[2i+1], multiplied by cos_i + j sin_i. Takes the
    same cos/sin (T, rotary_dim) as ``apply_rotary`` (rotate-half layout [f, f]) and uses
    their first half, one entry per pair. Dims beyond rotary_dim pass through.
    """
    rotary_dim = _check_rotary_width(x, cos)
    half = rotary_dim // 2
    rotation = torch.complex(cos[..., :half].float(), sin[..., :half].float())  # (T, rotary_dim/2)
    x_rot = x[..., :rotary_dim].float()  # (B, H, T, rotary_dim)
    pairs = torch.view_as_complex(x_rot.reshape(*x_rot.shape[:-1], half, 2))  # (B, H, T, rotary_dim/2)
    rotated = torch.view_as_real(pairs * rotation).flatten(-2)  # (B, H, T, rotary_dim)
    return torch.cat([rotated.to(x.dtype), x[..., rotary_dim:]], dim=-1)  # (B, H, T, D)


def interleaved_to_half_permutation(rotary_dim: int) -> torch.Tensor:
    """perm with x_half = x_interleaved[..., perm]: [0, 2, 4, ..., 1, 3, 5, ...].

    For weights: if W (out, in) produces interleaved-layout rotary dims, W[perm] produces
    the rotate-half layout (apply it per head to the rotary rows only).
    """
    if rotary_dim <= 0 or rotary_dim % 2 != 0:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    return torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2)])


def permute_rotary_rows(weight: torch.Tensor, head_dim: int, rotary_dim: int,
                        rotary_offset: int = 0) -> torch.Tensor:
    """Convert a projection from interleaved-layout to rotate-half-layout outputs.

    weight: (num_heads * head_dim, in) or a bias (num_heads * head_dim,). Within every head
    the rows rotary_offset .. rotary_offset + rotary_dim are reordered by
    ``interleaved_to_half_permutation``; all other rows stay. Examples: a Llama-style q_proj
    (rotary_offset 0, rotary_dim = head_dim * partial_rotary_factor); DeepSeek's q_b_proj
    (head_dim = qk_head_dim, rotary_offset = qk_nope_head_dim, rotary_dim = qk_rope_head_dim);
    kv_a_proj_with_mqa as one "head" (head_dim = kv_lora_rank + qk_rope_head_dim,
    rotary_offset = kv_lora_rank).
    """
    if weight.shape[0] % head_dim != 0:
        raise ValueError(f"{weight.shape[0]} rows are not a whole number of heads of {head_dim}")
    if rotary_offset < 0 or rotary_offset + rotary_dim > head_dim:
        raise ValueError(f"rotary rows {rotary_offset}..{rotary_offset + rotary_dim} do not fit "
                         f"in a head of {head_dim}")
    within_head = torch.arange(head_dim)  # (head_dim,)
    within_head[rotary_offset:rotary_offset + rotary_dim] = (
        rotary_offset + interleaved_to_half_permutation(rotary_dim))
    num_heads = weight.shape[0] // head_dim
    rows = (torch.arange(num_heads)[:, None] * head_dim + within_head).flatten()  # (H*head_dim,)
    return weight[rows]
