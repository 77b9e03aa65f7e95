"""Decoder blocks: the unit a transformer stacks, with a dense or an MoE feed-forward.

The idea
--------
A pre-norm block (GPT-2's variant, Radford et al. 2019; Llama's RMSNorm + SwiGLU, Touvron et
al. 2023) adds two residual branches to the stream it receives:

    u = x + Attention(RMSNorm(x))       # MHA, GQA (minimoe.attention) or MLA (minimoe.mla)
    h = u + FFN(RMSNorm(u))             # dense SwiGLU, or an MoE layer (minimoe.moe)

``DecoderLayer`` is that block, with the FFN an MoE in every layer that
``ModelConfig.is_moe_layer`` names (DeepSeek-V3: all but the first ``first_k_dense_replace``).
``ShortcutDecoderLayer`` is LongCat-Flash's variant, where the MoE branch starts in the
middle of the layer and joins at its end (its docstring gives the formula). Both return
``(output, moe_aux)``: the MoE's router statistics and balance losses, or None for a dense
block; ``merge_moe_aux`` collects them for ``minimoe.model.Transformer`` and ``minimoe.mtp``.

Module names follow transformers' DeepseekV3DecoderLayer (``self_attn``, ``mlp``,
``input_layernorm``, ``post_attention_layernorm``) and LongcatFlashDecoderLayer, so that
published checkpoints map onto these modules name for name (``minimoe.checkpoints``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from minimoe.attention import Attention
from minimoe.cache import KVCache
from minimoe.config import ModelConfig
from minimoe.experts import SwiGLU
from minimoe.kernel_switch import follows_config_kernels
from minimoe.mla import MultiHeadLatentAttention
from minimoe.moe import MoE
from minimoe.norm import RMSNorm


class DecoderLayer(nn.Module):
    """One pre-norm block: x + Attn(norm(x)), then + FFN(norm(.)); FFN dense or MoE."""

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.kernels = cfg.kernels  # "reference" | "triton", set around forward (and its recompute)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.attention == "mla":
            self.self_attn = MultiHeadLatentAttention(cfg, layer_index)
        else:
            self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # In a shortcut_moe model (LongCat-Flash) this plain block only serves as the MTP
        # module's block, which is one MLA sublayer and one *dense* FFN (model.mtp.* in the
        # LongCat checkpoint); its main layers are ShortcutDecoderLayer.
        self.is_moe = cfg.is_moe_layer(layer_index) and not cfg.shortcut_moe
        if self.is_moe:
            self.mlp = MoE(cfg)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    @follows_config_kernels
    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache] = None
    ) -> tuple[torch.Tensor, Optional[dict]]:
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)  # (B, T, C)
        if self.is_moe:
            ffn_out, moe_aux = self.mlp(self.post_attention_layernorm(x))  # (B, T, C)
        else:
            ffn_out, moe_aux = self.mlp(self.post_attention_layernorm(x)), None
        return x + ffn_out, moe_aux  # (B, T, C)


class ShortcutDecoderLayer(nn.Module):
    """LongCat-Flash's shortcut-connected MoE block (ScMoE; LongCat-Flash technical report
    arXiv:2509.01322, §2, "Shortcut-connected MoE"; transformers LongcatFlashDecoderLayer).

    One layer holds two pre-norm sublayer pairs (attention + dense SwiGLU each) and one MoE.
    The MoE reads the normalised hidden state after the *first* attention sublayer and its
    output is added only at the *end* of the layer:

        u   = x + MLA_0(norm_in_0(x))                 # (B, T, C) first attention sublayer
        h   = norm_post_0(u)                          # (B, T, C) shared by FFN_0 and the MoE
        m   = MoE(h)                                  # (B, T, C) the shortcut branch
        v   = u + FFN_0(h)                            # (B, T, C) first dense FFN
        w   = v + MLA_1(norm_in_1(v))                 # (B, T, C) second attention sublayer
        out = w + FFN_1(norm_post_1(w)) + m           # (B, T, C) second FFN, then the shortcut

    Why: in a plain MoE block the expert all-to-all (dispatch and combine across devices)
    sits between attention and the next layer, and nothing can run while it is in flight.
    Here nothing in (FFN_0, MLA_1, FFN_1) depends on m, so the MoE's communication overlaps
    that dense compute. Per token the layer costs two attention and two dense FFN passes
    plus the experts the router picks; with zero-computation experts (``cfg.n_zero_experts``,
    ``minimoe.moe``) that is between 0 and k FFN experts.

    The two attention sublayers are separate KV-cache slots: 2 * layer_index and
    2 * layer_index + 1 (transformers numbers them the same way).
    Submodule names follow transformers: self_attn.{0,1}, mlps.{0,1}, input_layernorm.{0,1},
    post_attention_layernorm.{0,1}, mlp (the MoE; its router is ``mlp.gate`` in minimoe,
    ``mlp.router.classifier`` in the checkpoints).
    """

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        if cfg.attention != "mla":
            raise ValueError(f"ModelConfig({cfg.name}): shortcut_moe is LongCat-Flash's block, "
                             f"built with attention='mla', got {cfg.attention!r}")
        self.layer_index = layer_index
        self.kernels = cfg.kernels
        C = cfg.hidden_size
        self.self_attn = nn.ModuleList(
            MultiHeadLatentAttention(cfg, 2 * layer_index + i) for i in range(2))
        self.mlps = nn.ModuleList(SwiGLU(C, cfg.intermediate_size) for _ in range(2))
        self.input_layernorm = nn.ModuleList(RMSNorm(C, cfg.rms_norm_eps) for _ in range(2))
        self.post_attention_layernorm = nn.ModuleList(
            RMSNorm(C, cfg.rms_norm_eps) for _ in range(2))
        self.is_moe = cfg.is_moe_layer(layer_index)
        self.mlp = MoE(cfg) if self.is_moe else None  # no shortcut branch in a dense layer

    @follows_config_kernels
    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache] = None
    ) -> tuple[torch.Tensor, Optional[dict]]:
        u = x + self.self_attn[0](self.input_layernorm[0](x), positions, cache)  # (B, T, C)
        h = self.post_attention_layernorm[0](u)  # (B, T, C)
        shortcut, moe_aux = self.mlp(h) if self.is_moe else (None, None)  # (B, T, C)
        v = u + self.mlps[0](h)  # (B, T, C)
        w = v + self.self_attn[1](self.input_layernorm[1](v), positions, cache)  # (B, T, C)
        out = w + self.mlps[1](self.post_attention_layernorm[1](w))  # (B, T, C)
        if shortcut is not None:
            out = out + shortcut  # (B, T, C) the MoE joins at the end of the layer
        return out, moe_aux


def run_layer(layer: DecoderLayer, x, positions, cache, use_checkpoint: bool):
    """Run one layer, optionally with activation checkpointing (recompute in backward).

    Checkpointing trades compute for memory: the layer's inner activations are dropped after
    the forward pass and recomputed during backward. The non-reentrant variant preserves the
    RNG state, so noisy gating draws the same noise twice. The MoE's token counter for the
    bias update is incremented again during recomputation; the bias update uses only the
    sign of (mean load - load), which a uniform factor of 2 does not change.
    """
    if use_checkpoint and torch.is_grad_enabled() and cache is None:
        return checkpoint(layer, x, positions, None, use_reentrant=False)
    return layer(x, positions, cache)


def merge_moe_aux(name: str, moe_aux: Optional[dict], router: dict, losses: dict) -> None:
    """Collect one MoE layer's statistics under its name and sum its balance losses."""
    if moe_aux is None:
        return
    router[name] = moe_aux["router"]
    for loss_name, value in moe_aux["losses"].items():
        losses[loss_name] = losses.get(loss_name, 0.0) + value
