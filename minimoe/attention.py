"""Causal self-attention: multi-head (MHA), grouped-query (GQA), QK-norm, partial RoPE.

The idea
--------
Each token asks a question (query), advertises what it holds (key) and offers content
(value). With H heads of width D, for every head h

    scores = Q_h K_h^T * scale            (T_q, T_k),  scale = D^-0.5
    scores[i, j] = -inf  where key j is in the future of query i   (causal mask)
    out_h  = softmax(scores) V_h          (T_q, D)

and the heads are concatenated and mixed by the output projection o_proj (Vaswani et al.
2017, §3.2). The D^-0.5 keeps the logits' variance near 1 for unit-variance q and k, so
the softmax is not saturated at initialisation.

Grouped-query attention (Ainslie et al. 2023, "GQA", §2)
--------------------------------------------------------
During decoding the cost that matters is reading the KV cache, not the FLOPs. GQA keeps
H query heads but only H_kv < H key/value heads; query head h uses key/value head
h // (H / H_kv). H_kv = H is ordinary MHA; H_kv = 1 is multi-query attention (Shazeer
2019). The cache shrinks by H / H_kv (Mixtral, Qwen3, Ling-2.0 use 4 to 8 times fewer KV
heads). In code, GQA is MHA after ``repeat_kv`` copies each K/V head to its query group;
the copies are not stored.

QK-norm (Dehghani et al. 2023, "Scaling Vision Transformers to 22B", §2; OLMoE; Qwen3)
--------------------------------------------------------------------------------------
Without a bound on |q| and |k| the logits can grow during training until the softmax
collapses to one-hot and training diverges. An RMSNorm on queries and keys bounds them.
Two placements exist in released models, ``cfg.qk_norm``:

* "per_head" (Qwen3, Ling-2.0 ``query_layernorm`` / ``key_layernorm``): RMSNorm over each
  head's D dims, one gain of size D shared by all heads, applied after the projection
  and before RoPE. Parameters q_norm.weight (D,), k_norm.weight (D,).
* "full" (OLMoE): RMSNorm over the whole projected width before it is split into heads:
  q_norm.weight (H*D,), k_norm.weight (H_kv*D,).

Normalisation happens before RoPE: a rotation preserves norms, so the order matters only
for which dims share the statistic, and the models above normalise first.

Partial RoPE (GPT-NeoX; Ling-2.0 partial_rotary_factor 0.5)
-----------------------------------------------------------
Only the first ``cfg.rotary_dim`` dims of each head rotate; the rest carry position-free
content. See minimoe.rope for RoPE itself and YaRN; the softmax scale is multiplied by the
rope's ``attention_scale_multiplier`` (1 unless a DeepSeek-style YaRN config asks for it).

Decoding with a cache
---------------------
With a KVCache (minimoe.cache), the keys and values of the new tokens are appended, time on
dim 1 as (B, T, H_kv, D), and the queries attend to the whole history. A query at absolute
position p = past + i sees keys 0..p. With no past, the mask is the usual lower triangle
(``is_causal=True``); with a past, the triangle is shifted right by ``past`` columns,
which ``is_causal`` cannot express (it aligns the triangle to the top-left corner), so an
explicit boolean mask is passed. The model, not this layer, calls ``cache.advance``.

What the reader should notice
-----------------------------
* ``attention_reference`` is the whole algorithm in four lines; the layer calls
  ``F.scaled_dot_product_attention`` (a fused kernel on GPUs) and the tests check both
  agree.
* Parameter names (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm) are those of the
  transformers Llama/Qwen3/OLMoE classes, so their checkpoints load without renaming.
  Bias (cfg.attention_bias, Qwen2 / GLM-4.5 style) is on q, k and v only, never on o_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimoe.cache import KVCache
from minimoe.config import ModelConfig
from minimoe.norm import RMSNorm
from minimoe.rope import RotaryEmbedding, apply_rotary


def causal_mask(num_queries: int, num_keys: int, past: int, device=None) -> torch.Tensor:
    """Boolean (num_queries, num_keys), True = may attend: query i sees keys j <= past + i."""
    query_positions = torch.arange(num_queries, device=device)[:, None] + past  # (T_q, 1)
    key_positions = torch.arange(num_keys, device=device)[None, :]  # (1, T_k)
    return key_positions <= query_positions  # (T_q, T_k)


def static_cache_mask(cache) -> torch.Tensor | None:
    """(T, max_length) bool from a pre-allocated cache (``minimoe.static_cache``), else None.

    Such a cache returns every slot, written or not, so that shapes never change; it knows
    the new tokens' positions and masks the slots after them (a plain KVCache returns
    exactly the history and the causal mask follows from its length)."""
    mask = getattr(cache, "attention_mask", None)
    return mask() if mask is not None else None


def repeat_kv(x: torch.Tensor, num_repeats: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * num_repeats, T, D): head h reads KV head h // num_repeats."""
    if num_repeats == 1:
        return x
    B, H_kv, T, D = x.shape
    x = x[:, :, None].expand(B, H_kv, num_repeats, T, D)  # (B, H_kv, n_rep, T, D) no copy
    return x.reshape(B, H_kv * num_repeats, T, D)  # (B, H, T, D)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        causal_offset: int | None) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) V, spelled out.

    q: (B, H, T_q, D); k: (B, H_k, T_k, D); v: (B, H_k, T_k, D_v), with H a multiple of H_k
    (GQA). causal_offset = number of earlier tokens before the first query (query i sees
    keys j <= causal_offset + i); None = no mask. Returns (B, H, T_q, D_v).
    """
    num_repeats = q.shape[1] // k.shape[1]
    k = repeat_kv(k, num_repeats)  # (B, H, T_k, D)
    v = repeat_kv(v, num_repeats)  # (B, H, T_k, D_v)
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, T_q, T_k)
    if causal_offset is not None:
        allowed = causal_mask(q.shape[-2], k.shape[-2], causal_offset, device=q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))  # (B, H, T_q, T_k)
    weights = scores.softmax(dim=-1)  # (B, H, T_q, T_k) rows sum to 1
    return (weights @ v.float()).to(q.dtype)  # (B, H, T_q, D_v)


class Attention(nn.Module):
    """MHA / GQA self-attention with optional QK-norm and partial RoPE (see module docstring)."""

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        if cfg.attention not in ("mha", "gqa"):
            raise ValueError(
                f"Attention implements attention='mha' or 'gqa', got {cfg.attention!r}; "
                "use minimoe.mla.MultiHeadLatentAttention for 'mla'"
            )
        if layer_index < 0:
            raise ValueError(f"layer_index must be >= 0, got {layer_index}")
        self.layer_index = layer_index
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.num_kv_groups = self.num_heads // self.num_kv_heads  # query heads per KV head
        self.head_dim = cfg.head_dim
        self.rotary_dim = cfg.rotary_dim
        self.qk_norm = cfg.qk_norm
        hidden, H, H_kv, D = cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim

        self.q_proj = nn.Linear(hidden, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(hidden, H_kv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(hidden, H_kv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, hidden, bias=False)
        if cfg.qk_norm == "per_head":
            self.q_norm = RMSNorm(D, eps=cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, eps=cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(H * D, eps=cfg.rms_norm_eps)
            self.k_norm = RMSNorm(H_kv * D, eps=cfg.rms_norm_eps)

        self.rotary_emb = RotaryEmbedding(self.rotary_dim, cfg.rope_theta,
                                          cfg.max_position_embeddings, cfg.rope_scaling)
        self.scale = D**-0.5 * self.rotary_emb.attention_scale_multiplier

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, H_kv, D = self.num_heads, self.num_kv_heads, self.head_dim

        # 1. project (and, for OLMoE-style QK-norm, normalise the full width)
        q = self.q_proj(x)  # (B, T, H*D)
        k = self.k_proj(x)  # (B, T, H_kv*D)
        v = self.v_proj(x)  # (B, T, H_kv*D)
        if self.qk_norm == "full":
            q = self.q_norm(q)  # (B, T, H*D)
            k = self.k_norm(k)  # (B, T, H_kv*D)

        # 2. split into heads (and, for Qwen3/Ling-style QK-norm, normalise each head)
        q = q.view(B, T, H, D)  # (B, T, H, D)
        k = k.view(B, T, H_kv, D)  # (B, T, H_kv, D)
        v = v.view(B, T, H_kv, D)  # (B, T, H_kv, D)
        if self.qk_norm == "per_head":
            q = self.q_norm(q)  # (B, T, H, D)
            k = self.k_norm(k)  # (B, T, H_kv, D)

        # 3. rotate the first rotary_dim dims of q and k by their absolute positions
        cos, sin = self.rotary_emb(positions)  # (T, rotary_dim) each
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, H_kv, T, D)
        v = v.transpose(1, 2)  # (B, H_kv, T, D)

        # 4. with a cache: store the new K/V (time on dim 1), attend to the whole history
        past = 0
        allowed = None  # (T, T_all) bool when the cache says which slots each query sees
        if cache is not None:
            history = cache.append(self.layer_index, k=k.transpose(1, 2), v=v.transpose(1, 2))
            k = history["k"].transpose(1, 2)  # (B, H_kv, T_all, D)
            v = history["v"].transpose(1, 2)  # (B, H_kv, T_all, D)
            past = k.shape[2] - T
            allowed = static_cache_mask(cache)  # a pre-allocated cache: all slots, masked

        # 5. GQA: each KV head serves num_kv_groups query heads
        k = repeat_kv(k, self.num_kv_groups)  # (B, H, T_all, D)
        v = repeat_kv(v, self.num_kv_groups)  # (B, H, T_all, D)

        # 6. causal softmax(Q K^T * scale) V
        if past == 0 and allowed is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=bool(T > 1), scale=self.scale)
        else:
            if allowed is None:
                allowed = causal_mask(T, k.shape[2], past, device=x.device)  # (T, T_all)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)
        # out: (B, H, T, D)

        # 7. concatenate heads and mix them
        out = out.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.o_proj(out)  # (B, T, C)
