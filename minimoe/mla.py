"""Multi-head Latent Attention (MLA): attention whose KV cache is a small shared latent.

Why
---
Decoding one token reads the whole KV cache of every layer, so for long contexts the
cache size, not the FLOPs, sets the speed and the batch size. MHA caches 2 * H * D numbers
per token per layer; GQA (minimoe.attention) divides that by sharing K/V heads, at some
cost in quality. MLA (DeepSeek-V2, Liu et al. 2024, §2.1; reused unchanged in DeepSeek-V3
§2.1.1 and LongCat-Flash) instead caches a low-rank *latent* from which every head's key
and value are rebuilt.

The formulas (DeepSeek-V2 §2.1.2, "Low-Rank Key-Value Joint Compression")
-------------------------------------------------------------------------
For the hidden state h_t of token t (width C), with kv_lora_rank = d_c << H * D:

    c_t^KV  = RMSNorm(W^DKV h_t)             (d_c,)   the latent: this is what is cached
    k_t^C   = W^UK c_t^KV                    (H, qk_nope_head_dim)  per-head keys
    v_t^C   = W^UV c_t^KV                    (H, v_head_dim)        per-head values

Queries are compressed the same way to save activation memory in training
(q_lora_rank = d_c'; DeepSeek-V2-Lite has no query compression, q_lora_rank None):

    c_t^Q   = RMSNorm(W^DQ h_t)              (d_c',)
    q_t^C   = W^UQ c_t^Q                     (H, qk_nope_head_dim)

Decoupled RoPE (DeepSeek-V2 §2.1.3)
-----------------------------------
RoPE cannot be applied to k^C: the rotation depends on the position and sits between
W^UQ and W^UK in q^T k, so W^UK could no longer be folded ("absorbed") into the query at
inference and keys would have to be rebuilt for every past position. MLA therefore carries
position in a separate, small part of every head:

    q_t^R   = RoPE(W^QR c_t^Q)               (H, qk_rope_head_dim)   one per head
    k_t^R   = RoPE(W^KR h_t)                 (qk_rope_head_dim,)     ONE, shared by all heads
    q_{t,i} = [q_{t,i}^C ; q_{t,i}^R],   k_{t,i} = [k_{t,i}^C ; k_t^R]
    o_{t,i} = sum_j softmax_j(q_{t,i} . k_{j,i} * scale) v_{j,i}^C
    u_t     = W^O [o_{t,1}; ...; o_{t,H}]

with scale = qk_head_dim^-0.5 (qk_head_dim = qk_nope_head_dim + qk_rope_head_dim), times
mscale^2 under DeepSeek-style YaRN (minimoe.rope, ``attention_scale_multiplier``). The
cache holds c^KV and the rotated k^R: kv_lora_rank + qk_rope_head_dim numbers per token
per layer. For DeepSeek-V3 that is 512 + 64 = 576, against 128 * (192 + 128) = 40960 for
MHA with the same heads: 71 times smaller.

Hugging Face parameter names (transformers ``DeepseekV3Attention``)
-------------------------------------------------------------------
    q_a_proj  = W^DQ (C -> q_lora_rank), q_a_layernorm, q_b_proj = [W^UQ; W^QR] per head
    q_proj    = the uncompressed query (C -> H * qk_head_dim) when q_lora_rank is None
    kv_a_proj_with_mqa = [W^DKV; W^KR] (C -> kv_lora_rank + qk_rope_head_dim): the "MQA"
                the name refers to is the single shared rope key
    kv_a_layernorm, kv_b_proj = [W^UK; W^UV] per head (kv_lora_rank -> H*(nope + v))
    o_proj    = W^O (H * v_head_dim -> C)

Bias follows transformers: ``cfg.attention_bias`` on q_a_proj, kv_a_proj_with_mqa and
o_proj; never on q_proj, q_b_proj or kv_b_proj. The two latent norms use eps 1e-6, the
default of both transformers and DeepSeek's inference code.

RoPE layout
-----------
This module rotates q^R and k^R in the rotate-half layout (``minimoe.rope.apply_rotary``,
the transformers default). DeepSeek's released weights were trained with the interleaved
(complex-pair) layout; transformers handles that with ``rope_interleave``, and minimoe's
checkpoint loader will instead permute the rope rows of q_b_proj (per head) and of
kv_a_proj_with_mqa once with ``interleaved_to_half_permutation``; scores are unchanged.

Three ways to run the same function (``mla_mode``)
-------------------------------------------------
All three compute exactly the attention above; they differ in what the KV cache holds
and in the order of the matrix products. Choose per module: ``mla.mla_mode = "absorbed"``,
or per call: ``mla(x, positions, cache, mode="naive")``.

* "latent" (the default; training and prefill): cache c^KV and k^R, rebuild every head's
  K and V from the *whole* cached latent at every step. Simple and identical to the
  training computation, but each decoding step costs O(T * d_c * H * (D_nope + D_v)) just
  to rebuild keys and values it already built one step earlier.
* "naive" (what an MHA runtime would do): decompress K and V once, for the new tokens
  only, and cache them per head: k (B, T, H, qk_head_dim) and v (B, T, H, v_head_dim),
  H * (qk_head_dim + v_head_dim) numbers per token per layer. Fast, but the cache is as
  large as MHA's; the compression buys nothing at inference.
* "absorbed" (DeepSeek-V2 §2.1.2, last paragraph; DeepSeek's inference/model.py
  ``attn_impl="absorb"``): cache c^KV and k^R as "latent" does, never build per-head K or
  V at all (the formulas below).

Absorbed decoding, in formulas
------------------------------
The derivation, step by step and checked in code, is in notebook 03, sections 5-7 (the
absorption, why RoPE needs its own key, the measured trade-off). For one head i, query
position t and key position j (d_c = kv_lora_rank, D_n = qk_nope_head_dim, D_r =
qk_rope_head_dim, D_v = v_head_dim; W^UK_i (D_n, d_c) and W^UV_i (D_v, d_c) are head i's
rows of kv_b_proj.weight, taken as views by ``absorbed_weights``):

    1. q^L_{t,i}     = (W^UK_i)^T q^C_{t,i}                       [d_c]  the absorbed query
    2. score_{t,j,i} = (q^L_{t,i} . c_j  +  q^R_{t,i} . k^R_j) * scale
    3. o_{t,i}       = W^UV_i (sum_j p_{t,j,i} c_j)               [D_v]  p = softmax_j(score)

Step 1 is associativity, q^C . (W^UK c_j) = ((W^UK)^T q^C) . c_j; step 3 is linearity
(W^UV_i does not depend on j). ``_attend_absorbed`` computes them in this order: q_latent =
einsum("bhtn,hnc->bhtc", q_nope, w_uk) (B, H, T, d_c); scores = q_latent @ c_kv^T + q_pe @
k_pe^T (B, H, T, S), one multi-query score of width d_c + D_r (576 for V3) against the
cached [c ; k^R]; out_latent = p @ c_kv (B, H, T, d_c), then W^UV per head (B, H, T, D_v).
Only the position-free part can be absorbed: a rotated content key would put R_{j-t}
between the query and W^UK (DeepSeek-V2 §2.1.3), hence the decoupled k^R. W^UV could be
folded further into o_proj (W^O_i W^UV_i, as the V2 paper notes), but that product holds
H * C * d_c numbers (V3: 470M per layer, more than the layer), so here, as in DeepSeek's
code, W^UV stays separate.

Cost per decoding step and cached token: naive reads H * (D_n + D_r + D_v) numbers and does
as many multiply-adds; absorbed reads d_c + D_r numbers and does H * (2 d_c + D_r)
multiply-adds: 1088 H against 320 H for V3's dims, 3.4x more arithmetic through 71x fewer
bytes (128 heads). It trades compute, which a GPU has in excess during decoding, for memory
traffic, which it does not. ``python -m minimoe.bench.mla_decode`` measures both on a CPU.

LongCat-Flash scale factors (``cfg.mla_scale_q_lora``, ``cfg.mla_scale_kv_lora``)
-------------------------------------------------------------------------------
LongCat-Flash (technical report §2; transformers ``LongcatFlashMLA``, whose ``forward``
is the source of the placement used here) multiplies

* the up-projected query, both q^C and q^R, by sqrt(hidden_size / q_lora_rank) (equal to
  scaling the normalised latent c^Q, since q_b_proj has no bias), before RoPE;
* the normalised kv latent c^KV (after kv_a_layernorm, before it is cached, so the
  cache holds the scaled latent) by sqrt(hidden_size / kv_lora_rank). Keys *and* values
  come from that latent, so both are scaled; the rope key k^R is not.

The factors compensate for the width change between hidden state and latent (a unit-RMS
latent of width 512 feeds projections initialised for width 6144). Both are off for every
other preset.

What the reader should notice
-----------------------------
* The three modes are the same function; tests/test_mla_absorbed.py checks them against
  each other and against a per-head re-derivation, in prefill and in step-by-step
  decoding.
* k^R is computed from h_t, not from the latent, and is not normalised.
* The value width v_head_dim may differ from the query/key width qk_head_dim;
  F.scaled_dot_product_attention accepts that.
* Caches of "latent" and "absorbed" hold the same tensors: a prompt prefilled one way can
  be decoded the other way. A "naive" cache holds per-head k and v instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimoe.attention import causal_mask, static_cache_mask
from minimoe.cache import KVCache
from minimoe.config import ModelConfig
from minimoe.norm import RMSNorm
from minimoe.rope import RotaryEmbedding, apply_rotary

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm eps in transformers and DeepSeek's code
MLA_MODES = ("latent", "naive", "absorbed")


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek MLA (see module docstring) with three equivalent inference modes.

    ``mla_mode`` (attribute, default "latent") or ``forward(..., mode=...)`` picks how the
    cache is used: "latent" caches c_kv and k_pe and rebuilds K/V, "naive" caches per-head
    k and v, "absorbed" caches c_kv and k_pe and attends in latent space.
    """

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        if cfg.attention != "mla":
            raise ValueError(
                f"MultiHeadLatentAttention needs attention='mla', got {cfg.attention!r}; "
                "use minimoe.attention.Attention for 'mha'/'gqa'"
            )
        if layer_index < 0:
            raise ValueError(f"layer_index must be >= 0, got {layer_index}")
        self.layer_index = layer_index
        self.mla_mode = "latent"
        self.num_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        hidden, H = cfg.hidden_size, self.num_heads

        # queries: low-rank (V2/V3) or full-rank (V2-Lite)
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)

        # keys and values: the latent plus the shared rope key, then the per-head up-projection
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim,
                                            bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank,
                                   H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, hidden, bias=cfg.attention_bias)

        self.rotary_emb = RotaryEmbedding(self.qk_rope_head_dim, cfg.rope_theta,
                                          cfg.max_position_embeddings, cfg.rope_scaling)
        self.scale = self.qk_head_dim**-0.5 * self.rotary_emb.attention_scale_multiplier
        # LongCat-Flash latent scale factors (1.0 = off; see the module docstring)
        self.mla_scale_q_lora = ((hidden / self.q_lora_rank) ** 0.5
                                 if getattr(cfg, "mla_scale_q_lora", False) else 1.0)
        self.mla_scale_kv_lora = ((hidden / self.kv_lora_rank) ** 0.5
                                  if getattr(cfg, "mla_scale_kv_lora", False) else 1.0)

    # ---- the up-projection weights, per head ---------------------------------------------
    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK (H, qk_nope_head_dim, d_c) and W^UV (H, v_head_dim, d_c), views of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim,
                                       self.kv_lora_rank)  # (H, nope + v_dim, d_c)
        return w[:, :self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None, mode: str | None = None) -> torch.Tensor:
        mode = self.mla_mode if mode is None else mode
        if mode not in MLA_MODES:
            raise ValueError(f"mla mode must be one of {MLA_MODES}, got {mode!r}")
        B, T, _ = x.shape
        H = self.num_heads
        rope = self.qk_rope_head_dim

        # 1. queries: [q^C ; q^R] per head
        if self.q_lora_rank is None:
            q = self.q_proj(x)  # (B, T, H*qk_head_dim)
        else:
            c_q = self.q_a_layernorm(self.q_a_proj(x))  # (B, T, q_lora_rank)
            q = self.q_b_proj(c_q)  # (B, T, H*qk_head_dim)
        if self.mla_scale_q_lora != 1.0:
            q = q * self.mla_scale_q_lora  # LongCat-Flash: nope and rope parts alike
        q = q.view(B, T, H, self.qk_head_dim).transpose(1, 2)  # (B, H, T, qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, rope], dim=-1)  # (B, H, T, nope), (B, H, T, rope)

        # 2. the latent c^KV and the single shared rope key k^R
        compressed = self.kv_a_proj_with_mqa(x)  # (B, T, kv_lora_rank + rope)
        c_kv, k_pe = compressed.split([self.kv_lora_rank, rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, kv_lora_rank)
        if self.mla_scale_kv_lora != 1.0:
            c_kv = c_kv * self.mla_scale_kv_lora  # LongCat-Flash: before caching; not k^R

        # 3. RoPE on the decoupled parts only
        cos, sin = self.rotary_emb(positions)  # (T, rope) each
        q_pe = apply_rotary(q_pe, cos, sin)  # (B, H, T, rope)
        k_pe = apply_rotary(k_pe[:, None], cos, sin)[:, 0]  # (B, T, rope) one "head"

        if mode == "naive":
            out = self._attend_naive(q_nope, q_pe, c_kv, k_pe, cache)
        elif mode == "absorbed":
            out = self._attend_absorbed(q_nope, q_pe, c_kv, k_pe, cache)
        else:
            out = self._attend_latent(q_nope, q_pe, c_kv, k_pe, cache)
        # out: (B, H, T, v_dim)
        out = out.transpose(1, 2).reshape(B, T, H * self.v_head_dim)  # (B, T, H*v_dim)
        return self.o_proj(out)  # (B, T, C)

    # ---- step 4 onwards, three ways ------------------------------------------------------
    def _sdpa(self, q, k, v, past: int, allowed=None) -> torch.Tensor:
        """Causal attention of T new queries over T_all = past + T keys.

        allowed (T, T_all) bool: the mask of a pre-allocated cache (``minimoe.static_cache``)."""
        T, T_all = q.shape[2], k.shape[2]
        if allowed is None and (past == 0 or T == 1):  # one new query sees every key
            return F.scaled_dot_product_attention(q, k, v, is_causal=bool(past == 0 and T > 1),
                                                  scale=self.scale)
        if allowed is None:
            allowed = causal_mask(T, T_all, past, device=q.device)  # (T, T_all)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)

    def _stored(self, cache) -> dict:
        """What this layer already holds in the cache (empty for caches without ``layers``)."""
        layers = getattr(cache, "layers", None)
        return layers[self.layer_index] if layers is not None else {}

    def _decompress(self, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Per-head keys (B, H, T, qk_head_dim) and values (B, H, T, v_dim) from the latent."""
        B, T, _ = c_kv.shape
        H, nope, rope, v_dim = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        kv = self.kv_b_proj(c_kv)  # (B, T, H*(nope + v_dim))
        kv = kv.view(B, T, H, nope + v_dim).transpose(1, 2)  # (B, H, T, nope + v_dim)
        k_nope, v = kv.split([nope, v_dim], dim=-1)  # (B, H, T, nope), (B, H, T, v_dim)
        k_pe = k_pe[:, None].expand(B, H, T, rope)  # (B, H, T, rope) shared by heads
        return torch.cat([k_nope, k_pe], dim=-1), v  # (B, H, T, qk_head_dim), (B, H, T, v_dim)

    def _attend_latent(self, q_nope, q_pe, c_kv, k_pe, cache):
        """Cache the latent; rebuild K and V for the whole history (training, prefill)."""
        T = c_kv.shape[1]
        if cache is not None:
            history = cache.append(self.layer_index, c_kv=c_kv, k_pe=k_pe)
            c_kv = history["c_kv"]  # (B, T_all, kv_lora_rank)
            k_pe = history["k_pe"]  # (B, T_all, rope)
        k, v = self._decompress(c_kv, k_pe)  # (B, H, T_all, qk_head_dim), (B, H, T_all, v_dim)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, H, T, qk_head_dim)
        return self._sdpa(q, k, v, past=c_kv.shape[1] - T,
                          allowed=static_cache_mask(cache))  # (B, H, T, v_dim)

    def _attend_naive(self, q_nope, q_pe, c_kv, k_pe, cache):
        """Decompress K and V for the new tokens only; cache them per head."""
        T = c_kv.shape[1]
        k, v = self._decompress(c_kv, k_pe)  # (B, H, T, qk_head_dim), (B, H, T, v_dim)
        if cache is not None:
            if "c_kv" in self._stored(cache):
                raise ValueError("this cache holds latents ('latent'/'absorbed' mode); "
                                 "mode 'naive' needs a cache of per-head k and v")
            history = cache.append(self.layer_index, k=k.transpose(1, 2), v=v.transpose(1, 2))
            k = history["k"].transpose(1, 2)  # (B, H, T_all, qk_head_dim)
            v = history["v"].transpose(1, 2)  # (B, H, T_all, v_dim)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, H, T, qk_head_dim)
        return self._sdpa(q, k, v, past=k.shape[2] - T,
                          allowed=static_cache_mask(cache))  # (B, H, T, v_dim)

    def _attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, cache):
        """Attention in latent space: W^UK folded into the query, W^UV applied after.

        Einsum letters: b batch, h head, t new token, s cached token, n qk_nope_head_dim,
        r qk_rope_head_dim, c kv_lora_rank, v v_head_dim.
        """
        B, H, T, _ = q_nope.shape
        if cache is not None:
            if "k" in self._stored(cache):
                raise ValueError("this cache holds per-head k and v ('naive' mode); "
                                 "mode 'absorbed' needs a cache of latents")
            history = cache.append(self.layer_index, c_kv=c_kv, k_pe=k_pe)
            c_kv = history["c_kv"]  # (B, S, d_c)
            k_pe = history["k_pe"]  # (B, S, rope)
        S = c_kv.shape[1]
        # BEGIN SOLUTION mla-absorption
        w_uk, w_uv = self.absorbed_weights()  # (H, n, c), (H, v, c)

        # step 1: the query moved into latent space, q^L = (W^UK)^T q^C
        q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)  # (B, H, T, d_c)
        # step 2: scores against the shared latent and the shared rope key (MQA-like: one
        # matmul with the H*T query rows stacked)
        scores = q_latent.reshape(B, H * T, -1) @ c_kv.transpose(1, 2)  # (B, H*T, S)
        scores = scores + q_pe.reshape(B, H * T, -1) @ k_pe.transpose(1, 2)  # (B, H*T, S)
        scores = scores.view(B, H, T, S) * self.scale  # (B, H, T, S)
        past = S - T
        allowed = static_cache_mask(cache)  # (T, S) or None
        if allowed is None and T > 1:
            allowed = causal_mask(T, S, past, device=scores.device)  # (T, S)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))  # (B, H, T, S)
        softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # bf16 -> float32
        weights = scores.softmax(dim=-1, dtype=softmax_dtype).to(c_kv.dtype)  # (B, H, T, S)
        # step 3: attend over the latents, then decompress once per head
        out_latent = (weights.view(B, H * T, S) @ c_kv).view(B, H, T, -1)  # (B, H, T, d_c)
        return torch.einsum("bhtc,hvc->bhtv", out_latent, w_uv)  # (B, H, T, v_dim)
        # END SOLUTION
