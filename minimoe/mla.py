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

What the reader should notice
-----------------------------
* K and V are rebuilt from the whole cached latent at every decoding step here: simple
  and exactly equal to the training-time computation, but it costs O(T * d_c * H * D) per
  step. The "absorbed" form (fold W^UK into the query and W^UV into the output, attend
  in latent space, as in DeepSeek's inference code) is added later; it is an algebraic
  rearrangement of the same function.
* k^R is computed from h_t, not from the latent, and is not normalised.
* The value width v_head_dim may differ from the query/key width qk_head_dim;
  F.scaled_dot_product_attention accepts that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimoe.attention import causal_mask
from minimoe.cache import KVCache
from minimoe.config import ModelConfig
from minimoe.norm import RMSNorm
from minimoe.rope import RotaryEmbedding, apply_rotary

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm eps in transformers and DeepSeek's code


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek MLA (see module docstring); caches only the latent c_kv and the rope key k_pe."""

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

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.num_heads
        nope, rope, v_dim = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim

        # 1. queries: [q^C ; q^R] per head
        if self.q_lora_rank is None:
            q = self.q_proj(x)  # (B, T, H*qk_head_dim)
        else:
            c_q = self.q_a_layernorm(self.q_a_proj(x))  # (B, T, q_lora_rank)
            q = self.q_b_proj(c_q)  # (B, T, H*qk_head_dim)
        q = q.view(B, T, H, self.qk_head_dim).transpose(1, 2)  # (B, H, T, qk_head_dim)
        q_nope, q_pe = q.split([nope, rope], dim=-1)  # (B, H, T, nope), (B, H, T, rope)

        # 2. the latent c^KV and the single shared rope key k^R
        compressed = self.kv_a_proj_with_mqa(x)  # (B, T, kv_lora_rank + rope)
        c_kv, k_pe = compressed.split([self.kv_lora_rank, rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, kv_lora_rank)

        # 3. RoPE on the decoupled parts only
        cos, sin = self.rotary_emb(positions)  # (T, rope) each
        q_pe = apply_rotary(q_pe, cos, sin)  # (B, H, T, rope)
        k_pe = apply_rotary(k_pe[:, None], cos, sin)[:, 0]  # (B, T, rope) one "head"

        # 4. with a cache: store only the latent and the rotated rope key
        past = 0
        if cache is not None:
            history = cache.append(self.layer_index, c_kv=c_kv, k_pe=k_pe)
            c_kv = history["c_kv"]  # (B, T_all, kv_lora_rank)
            k_pe = history["k_pe"]  # (B, T_all, rope)
            past = c_kv.shape[1] - T
        T_all = c_kv.shape[1]

        # 5. rebuild per-head keys and values from the latent
        kv = self.kv_b_proj(c_kv)  # (B, T_all, H*(nope + v_dim))
        kv = kv.view(B, T_all, H, nope + v_dim).transpose(1, 2)  # (B, H, T_all, nope + v_dim)
        k_nope, v = kv.split([nope, v_dim], dim=-1)  # (B, H, T_all, nope), (B, H, T_all, v_dim)
        k_pe = k_pe[:, None].expand(B, H, T_all, rope)  # (B, H, T_all, rope) shared by heads
        k = torch.cat([k_nope, k_pe], dim=-1)  # (B, H, T_all, qk_head_dim)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, H, T, qk_head_dim)

        # 6. causal attention (value width may differ from query/key width)
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale)
        else:
            allowed = causal_mask(T, T_all, past, device=x.device)  # (T, T_all)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)
        # out: (B, H, T, v_dim)

        out = out.transpose(1, 2).reshape(B, T, H * v_dim)  # (B, T, H*v_dim)
        return self.o_proj(out)  # (B, T, C)
